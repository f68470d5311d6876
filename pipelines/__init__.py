"""Thin entry points: each module has get_args_parser() and main(args) -> int; cli.py gathers them."""
