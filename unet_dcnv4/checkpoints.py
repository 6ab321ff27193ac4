"""Checkpoint folders of both trainers (`checkpoints/checkpoint-<step>`): listing, the latest, pruning and a save
that a kill at any point leaves with its newest complete checkpoint findable; and the same atomic replacement for
a run's other outputs (a folder, a file).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

__all__ = ["CHECKPOINT_PREFIX", "CHECKPOINT_PATTERN", "STATE_FILE", "FAULT_ENV", "FAULT_POINTS", "list_checkpoints",
           "latest_checkpoint", "resolve_resume_checkpoint", "prune_checkpoints", "save_checkpoint", "replace_folder",
           "replace_file"]

CHECKPOINT_PREFIX = "checkpoint-"
# A checkpoint folder's name: its step, and `.old` for one moved aside by a save of the same step.
CHECKPOINT_PATTERN = re.compile(re.escape(CHECKPOINT_PREFIX) + r"(\d+)(\.old)?")
# Written last into every checkpoint: a folder without it is incomplete.
STATE_FILE = "training_state.json"
# Test hook: the environment variable and the points of `save_checkpoint` where it kills the process.
FAULT_ENV = "UNET_DCNV4_FAULT_AT"
FAULT_POINTS = ("after_save_state", "after_config", "after_state_file", "between_renames", "after_rename",
                "while_deleting")


def list_checkpoints(checkpoints_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in a folder as (step, path), oldest first; unfinished `.tmp` folders are skipped.

    A `checkpoint-<step>.old` folder counts for its step when `checkpoint-<step>` is missing: a save of the same
    step killed between its two renames leaves the previous checkpoint there (see `save_checkpoint`).
    """
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    found = {}
    for entry in root.iterdir():
        match = CHECKPOINT_PATTERN.fullmatch(entry.name)
        if match and entry.is_dir() and (entry / STATE_FILE).is_file():
            step = int(match.group(1))
            if match.group(2) is None or step not in found:
                found[step] = entry
    return sorted(found.items())


def latest_checkpoint(checkpoints_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    found = list_checkpoints(checkpoints_dir)
    return found[-1][1] if found else None


def resolve_resume_checkpoint(value: str | None, checkpoints_dir: str | os.PathLike) -> Path | None:
    """Maps `resume_from_checkpoint` to a checkpoint folder.

    Args:
        value: None (start fresh), "latest" (the newest complete checkpoint, None when there is none) or a path.
        checkpoints_dir: the run's checkpoints folder, searched for "latest".
    """
    if value is None:
        return None
    if value == "latest":
        return latest_checkpoint(checkpoints_dir)
    path = Path(value)
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"resume_from_checkpoint {value!r} is not a complete checkpoint folder "
                         f"(expected 'latest' or a folder holding {STATE_FILE})")
    return path


def _fault_point(name: str) -> None:
    """Kills this process at `name` when the environment variable FAULT_ENV says so: a test hook showing that a
    kill anywhere in `save_checkpoint` loses nothing."""
    assert name in FAULT_POINTS
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _delete_checkpoint(path: Path) -> None:
    # The state file goes first: a deletion killed half-way leaves a folder that list_checkpoints no longer counts.
    (path / STATE_FILE).unlink(missing_ok=True)
    _fault_point("while_deleting")
    shutil.rmtree(path)


def prune_checkpoints(checkpoints_dir: str | os.PathLike, total_limit: int | None,
                      keep: str | os.PathLike | None = None) -> list[Path]:
    """Deletes complete checkpoints so that at most `total_limit` remain; returns the deleted ones.

    Args:
        checkpoints_dir: the run's checkpoints folder.
        total_limit: how many complete checkpoints to keep, None for all.
        keep: the checkpoint just written, never deleted. Checkpoints of a higher step than it are older than it
            (an earlier run, or the steps after the checkpoint a resume went back to) and go first, then the
            lowest steps.
    """
    if total_limit is None:
        return []
    found = list_checkpoints(checkpoints_dir)
    keep = Path(keep) if keep is not None else None
    kept_step = next((step for step, path in found if path == keep), None)
    candidates = [(step, path) for step, path in found if path != keep]
    if kept_step is not None:
        candidates.sort(key=lambda item: (item[0] < kept_step, item[0]))
    doomed = [path for _, path in candidates[:max(0, len(found) - total_limit)]]
    for path in doomed:
        _delete_checkpoint(path)
    return doomed


def save_checkpoint(accelerator, checkpoints_dir: str | os.PathLike, step: int, state: dict,
                    files: dict[str, str] | None = None, total_limit: int | None = None) -> Path:
    """Saves the accelerator state atomically to `<checkpoints_dir>/checkpoint-<step>`; call on every process.

    Everything is written to `checkpoint-<step>.tmp` first, `STATE_FILE` last, and renamed once complete, so an
    interrupted save never leaves a folder that `latest_checkpoint` would pick. After a successful save the
    complete checkpoints beyond `total_limit` are deleted (`prune_checkpoints`), never the one just written. A kill
    at any point leaves the newest complete checkpoint findable by `list_checkpoints` (the `FAULT_POINTS` are where
    the tests kill it).

    Args:
        accelerator: the run's `accelerate.Accelerator` (models, optimizer and custom objects registered).
        checkpoints_dir: the run's checkpoints folder.
        step: the optimizer step the state belongs to.
        state: JSON-serialisable facts the run needs to resume, written as `STATE_FILE`.
        files: more text files to write into the checkpoint, {name: text} (the resolved config).
        total_limit: how many complete checkpoints to keep, None for all.

    Returns:
        The final checkpoint folder.
    """
    root = Path(checkpoints_dir)
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    tmp = root / f"{CHECKPOINT_PREFIX}{step}.tmp"
    old = root / f"{CHECKPOINT_PREFIX}{step}.old"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        # Left over from a save that was interrupted; its content is unusable.
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fault_point("after_save_state")
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        _fault_point("after_config")
        # Written last: list_checkpoints only counts folders that hold it.
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        _fault_point("after_state_file")
        # A checkpoint of the same step (saved again after a resume) is moved aside, not deleted, until the
        # new one is in place: killed between the two renames, list_checkpoints finds the `.old` one.
        if final.exists():
            if old.exists():
                _delete_checkpoint(old)
            os.replace(final, old)
            _fault_point("between_renames")
        os.replace(tmp, final)
        _fault_point("after_rename")
        if old.exists():
            _delete_checkpoint(old)
        prune_checkpoints(root, total_limit, keep=final)
    accelerator.wait_for_everyone()
    return final


def replace_folder(final: str | os.PathLike, write) -> Path:
    """Writes a folder with `write(folder)` and puts it in place of `final` so that a kill at any point leaves
    either the previous complete folder or the new one.

    The new folder is written to `<final>.tmp`; the previous one is moved aside to `<final>.old` and deleted once
    the new one is renamed into place. A kill between those two renames leaves the previous folder as
    `<final>.old`, which the next call deletes; an exception in `write` leaves `final` as it was.

    Args:
        final: the folder to replace (it need not exist).
        write: called with the temporary folder (created empty); writes the whole content.

    Returns:
        `final` as a Path.
    """
    final = Path(final)
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    # Left over from a replacement that was interrupted: `tmp` is unfinished, `old` was replaced already when
    # `final` exists, else it is the only complete copy and goes back into place.
    shutil.rmtree(tmp, ignore_errors=True)
    if old.exists():
        if final.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, final)
    tmp.mkdir(parents=True)
    write(tmp)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def replace_file(path: str | os.PathLike, text: str) -> Path:
    """Writes `text` to `path` through a temporary sibling renamed over it: a kill at any point leaves the previous
    file or the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
