"""draftfeed package."""
