"""The one exception type users see (its message always says what to do next), and what the messages share."""


class FeaturecacheError(Exception):
    """A problem with the user's input or environment, worded as the fix.

    Entry points print the message (no traceback) and exit with status 2.
    """


def check_seed(seed: int | None) -> None:
    """A seed numpy and scikit-learn accept (0 to 2**32 - 1): another one failed deep inside them. None: no seed."""
    if seed is not None and not 0 <= seed < 2**32:
        raise FeaturecacheError(f"--seed {seed} is out of range; a seed is an integer from 0 to 2**32 - 1")


def check_workers(workers: int | None) -> None:
    """Decode processes torch's DataLoader accepts (0 or more): a negative count failed deep inside it (extract and
    finetune both take ``--workers``). None: the caller's default."""
    if workers is not None and workers < 0:
        raise FeaturecacheError(
            f"--workers {workers}: must be 0 (decode in the main process) or a positive number of decode processes; "
            f"leave it out for the default"
        )


_SAID: set[tuple[object, ...]] = set()


def first_time(*key: object) -> bool:
    """True the first time this process asks about ``key``, False after: for a warning that several readers of the
    same thing would repeat (compare-layers reads a folder, its caches and their heads once per base)."""
    if key in _SAID:
        return False
    _SAID.add(key)
    return True


def close_names(query: str, names: list[str] | tuple[str, ...], *, n: int = 8) -> list[str]:
    """The ``names`` a mistyped ``query`` most likely meant, best first: near spellings (difflib), then names that
    contain its first word. Typos are rarely in the first word alone (``efficientnet_lite`` for
    ``efficientnet_lite0``, ``_blocks.2.ad`` for ``_blocks.2.add``), so spelling ranks first."""
    import difflib

    near = difflib.get_close_matches(query, names, n=n, cutoff=0.75)
    word = query.replace("-", "_").split("_")[0].split(".")[0].lower()
    containing = [name for name in names if word and word in name.lower() and name not in near]
    return (near + containing)[:n]
