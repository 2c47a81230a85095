"""Offline analysis of run files: `hpcmoe report RUN.h5 [MORE.h5 ...] [--out DIR]` (to be written)."""


def main(runs: list[str], out: str | None) -> int:
    raise ValueError("hpcmoe report is not written yet")
