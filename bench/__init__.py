"""Benchmarks: each prints a table and writes it under bench/results/ with device, command and date."""
