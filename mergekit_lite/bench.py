"""Benchmark placeholder (filled in below)."""


def add_arguments(p):
    pass


def run_bench(args):
    raise NotImplementedError
