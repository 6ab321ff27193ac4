"""Progress bars for the trainers and the latent cache: tqdm's live bar on a terminal, and into a file or pipe a
plain line every `interval` seconds instead of a carriage-return update per step.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

__all__ = ["progress", "LOG_INTERVAL"]

# Seconds between two lines of a progress bar written to a file or pipe.
LOG_INTERVAL = 10.0


class _Lines:
    """A text stream that turns tqdm's carriage-return redraws into whole lines."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip("\n")
        if text.strip():
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


class _LogBar(tqdm):
    """A tqdm that redraws only at its interval: `set_postfix` waits for the next line instead of drawing one."""

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        super().set_postfix(ordered_dict, refresh=False, **kwargs)


def progress(iterable=None, total: int | None = None, desc: str | None = None, initial: int = 0,
             disable: bool = False, file=None, interval: float = LOG_INTERVAL):
    """A tqdm progress bar over `iterable` (or `total` steps updated by hand) that suits where it is written.

    Args:
        iterable: what to iterate, or None for a bar advanced with `update`.
        total: the number of steps (default: `len(iterable)` where it has one).
        desc: the label in front of the bar.
        initial: the steps already done (a resumed run).
        disable: no output at all (processes other than the main one).
        file: the text stream, default sys.stderr. On a terminal the bar is tqdm's live one; elsewhere (a log
            file, a pipe) it writes one plain line at most every `interval` seconds, and a last one at the end.
        interval: seconds between two lines written to a file or pipe.
    """
    file = sys.stderr if file is None else file
    isatty = getattr(file, "isatty", None)
    if isatty is not None and isatty():
        return tqdm(iterable, total=total, desc=desc, initial=initial, disable=disable, file=file)
    return _LogBar(iterable, total=total, desc=desc, initial=initial, disable=disable, file=_Lines(file),
                   mininterval=interval, maxinterval=interval, ascii=True, dynamic_ncols=False, ncols=100)
