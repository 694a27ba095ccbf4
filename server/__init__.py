"""The service: the gRPC servicer, scheduler, sessions, admission, data plane, CUDA graphs for serving, the
admin and NeMo HTTP ports, and the `draftfeed` command. The target itself (loading, capture, features, the
in-process backends) is `draftfeed.target`."""
