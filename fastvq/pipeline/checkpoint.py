"""Checkpoints that survive a kill at any moment, load with weights_only=True, and resume exactly.

write_atomically writes a file through a temporary beside the target, fsyncs it, renames it onto
the target (os.replace is atomic on POSIX and Windows) and fsyncs the directory so that the rename
itself is durable. A process killed at any point leaves at `path` either the previous complete file
or the new one, never a partial file; the killed write's temporary file (".<name>.<pid>-<random>.tmp")
is never read by load_checkpoint and is deleted by the next write to `path`. save_checkpoint writes
through it, and so do the logs (metrics CSV, plots, image grids).

The state format keeps to what torch.load(weights_only=True) accepts, so loading a checkpoint runs
no pickled code: tensors, numbers, strings, bytes, None, dtypes, devices and dicts / lists / tuples
/ sets of those. Configs are stored as plain dicts, RNG states as tensors (capture_rng_state), and
model / optimizer state_dicts already qualify. save_checkpoint checks this before writing, so a
state that could not be resumed fails at the first save rather than at the resume days later.

Exact resume: a training_state holds everything the next step reads (model, loss and optimizer
state dicts, the step, the data position, every process's global RNG states and the states of the
generators the run keeps of its own). A resumed run seeds and builds everything as a fresh run does,
loads the parts (resume_training), and restores the RNG states last, just before its first step
(restore_training_rng), so that on a CPU it continues bit for bit as the uninterrupted run would have.
"""
from __future__ import annotations

import errno
import os
import random
import secrets
import stat
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

LAST_CHECKPOINT = "last.ckpt"  # the file resume="auto" looks for in the output directory

_PLAIN_TYPES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size)
_CONTAINERS = (dict, OrderedDict, list, tuple, set)


def _check_plain(value, where: str) -> None:
    """Raise TypeError naming the first entry weights_only loading would refuse."""
    # Exact types: subclasses (numpy.float64 is a float, IntEnum an int) pickle as their own class.
    if isinstance(value, torch.Tensor) or type(value) in _PLAIN_TYPES:
        return
    if type(value) not in _CONTAINERS:
        raise TypeError(f"save_checkpoint: {where} is a {type(value).__module__}.{type(value).__qualname__}; a "
                        f"checkpoint holds only tensors, numbers, strings, None and dicts/lists/tuples of them "
                        f"(store configs as dicts and arrays as tensors)")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain(key, f"a key of {where}")
            _check_plain(item, f"{where}[{key!r}]")
    else:
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")


def _temporary_files(path: Path) -> list[Path]:
    return list(path.parent.glob(f".{path.name}.*.tmp"))


def _first_non_directory(directory: Path) -> Path | None:
    """The first existing path on the way up to `directory` (itself included) that is not a
    directory, or None when `directory` exists as one or can be created."""
    for candidate in (directory, *directory.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
        if candidate.is_symlink():  # a dangling link: mkdir would fail on it
            return candidate
    return None


def check_output_dir(directory, what: str = "--out", *, writable: bool = True) -> Path:
    """Refuse, before any work, an output directory that cannot be made or written: one that
    exists as a file (or a device), one under a file, and (writable=True) one whose nearest
    existing directory this process may not write into (permissions, a read-only file system).
    ValueError / PermissionError naming it; nothing is created."""
    directory = Path(directory)
    blocker = _first_non_directory(directory)
    if blocker == directory:
        raise ValueError(f"{what}: {directory} exists and is not a directory; give a directory")
    if blocker is not None:
        raise ValueError(f"{what}: cannot create {directory}: {blocker} is not a directory")
    if writable:
        existing = next((p for p in (directory, *directory.parents) if p.is_dir()), None)
        if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, f"{what}: cannot write into {existing} (no permission, or a "
                                                f"read-only file system); choose another directory")
    return directory


def check_output_file(path, what: str = "--out", *, writable: bool = True) -> Path:
    """As check_output_dir, for a file written by write_atomically: absent or a regular file (then
    replaced), never a directory or a device such as /dev/null (the rename onto the target would
    replace the device itself)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what}: {path} is a directory; give a file name")
    if os.path.lexists(path) and not (path.exists() and stat.S_ISREG(path.stat().st_mode)):
        raise ValueError(f"{what}: {path} exists and is not a regular file (a device, a pipe or a dangling "
                         f"link); give a file name")
    blocker = _first_non_directory(path.parent)
    if blocker is not None:
        raise ValueError(f"{what}: cannot write {path}: {blocker} is not a directory")
    check_output_dir(path.parent, what, writable=writable)
    return path


# errnos of a write that the storage refused (full, over quota, read-only, failing, file too large)
_STORAGE_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EIO, errno.EFBIG, errno.EACCES, errno.EPERM,
                   getattr(errno, "EDQUOT", errno.ENOSPC)}


class _WriteRecorder:
    """A file object that remembers the OSError its writes raised: torch.save turns a failed write
    (a full disk) into a RuntimeError about stream positions; write_atomically raises the OSError."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def write_atomically(path, write, *, text: bool = False) -> Path:
    """Call write(f) on a new temporary file beside `path`, then make it `path` atomically and
    durably (see the module docstring); returns the Path. The file is binary, or with text=True
    text without newline translation (what the csv module expects).

    ValueError if `path` is a directory or not a regular file (/dev/null), or lies under a file;
    an OSError that says which file could not be written (a full disk: errno ENOSPC) if a write
    fails, with the target untouched and the temporary removed."""
    path = check_output_file(path, "write_atomically", writable=False)  # the write itself tells
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in _temporary_files(path):  # from writes killed before their rename
        leftover.unlink(missing_ok=True)
    # Not tempfile.mkstemp: its files are private (0600) whatever the umask, and these are not.
    temporary = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    recorder = None
    try:
        try:
            with os.fdopen(fd, "w" if text else "wb", **({"newline": ""} if text else {})) as f:
                recorder = _WriteRecorder(f)
                write(recorder)
                f.flush()
                os.fsync(f.fileno())
        except Exception as e:  # the file's close flushes too: a full disk may show only there
            failed = recorder.error if recorder is not None else None
            if failed is None and isinstance(e, OSError) and e.errno in _STORAGE_ERRORS:
                failed = e
            if failed is None:
                raise
            raise OSError(failed.errno, f"cannot write {path}: {failed.strerror or failed}") from e
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def save_checkpoint(path, state: dict) -> Path:
    """Atomically write `state` (a dict, see the module docstring) to `path`; returns the Path."""
    if not isinstance(state, dict):
        raise TypeError(f"save_checkpoint: state must be a dict, got {type(state).__name__}")
    _check_plain(state, "state")
    return write_atomically(path, lambda f: torch.save(state, f))


def _fsync_directory(directory: Path) -> None:
    # Makes the rename durable across a power loss. Windows cannot open a directory; there the
    # rename is all we can do.
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _first_line(error: Exception) -> str:
    """torch's unpickling errors run to a dozen lines of advice; the first sentence says what failed."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0].split(". ")[0] if lines else ""


def load_checkpoint(path, map_location="cpu") -> dict:
    """The state dict saved at `path`, loaded with weights_only=True (no pickled code runs).

    FileNotFoundError if `path` does not exist; ValueError naming it if it is not a complete
    checkpoint of this format (truncated, corrupt, another kind of file, or objects beyond tensors
    and plain containers).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_checkpoint: no checkpoint file at {path}")
    _check_map_location(map_location)
    if path.stat().st_size == 0:
        raise ValueError(f"load_checkpoint: {path} is empty (0 bytes): not a checkpoint (a copy or a save that "
                         f"did not finish?)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... by failure kind
        raise ValueError(f"load_checkpoint: {path} is not a loadable checkpoint (corrupt, truncated or not "
                         f"weights-only): {type(e).__name__}: {_first_line(e) or 'unexpected end of file'}") from e
    if not isinstance(state, dict):
        raise ValueError(f"load_checkpoint: {path} holds a {type(state).__name__}, expected a dict")
    _check_entries(state, path)
    return state


def _check_map_location(map_location) -> None:
    """A CUDA map_location without CUDA says so (torch.load's own error reads like a corrupt file)."""
    if isinstance(map_location, (str, torch.device)):
        try:
            device = torch.device(map_location)
        except RuntimeError:
            raise ValueError(f"load_checkpoint: map_location {map_location!r} is not a device (cpu, cuda, "
                             f"cuda:1, ...)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"load_checkpoint: map_location is {map_location!r} but CUDA is not available "
                             f"(torch {torch.__version__}, {torch.cuda.device_count()} CUDA devices); load on cpu")


# What the checkpoints the pipeline writes hold, by kind: an entry missing means a damaged or
# hand-edited file. Checked at load, so the error names the file rather than a KeyError deep down.
_ENTRIES = {
    "vqgan": ("config", "model"),
    "vqgan-train": ("config", "step", "rng", "model"),
    "gpt": ("config", "layout", "model", "vqgan"),
    "gpt-train": ("config", "step", "rng", "model", "layout"),
}
_LAYOUT_KEYS = {"n_embed": 1, "h": 1, "w": 1, "size": 1, "classes": 0}  # name: minimum


def _check_entries(state: dict, path: Path) -> None:
    kind = state.get("kind")
    if kind not in _ENTRIES:
        return  # not one of the pipeline's: the caller decides what it needs
    missing = [name for name in _ENTRIES[kind] if name not in state]
    if missing:
        raise ValueError(f"{path}: damaged {kind} checkpoint: no {', '.join(map(repr, missing))} entry")
    for name in ("config", "model"):
        if not isinstance(state[name], dict):
            raise ValueError(f"{path}: damaged {kind} checkpoint: {name!r} is a {type(state[name]).__name__}, "
                             f"expected a dict")
    if kind == "gpt":
        vqgan = state["vqgan"]
        if not isinstance(vqgan, dict) or not isinstance(vqgan.get("config"), dict) \
                or not isinstance(vqgan.get("model"), dict):
            raise ValueError(f"{path}: damaged gpt checkpoint: 'vqgan' must hold the VQGAN's 'config' and 'model'")
    if "layout" in _ENTRIES[kind]:
        check_layout(state["layout"], f"{path}: damaged {kind} checkpoint")


def check_layout(layout, where: str) -> dict:
    """A GPT's code layout (n_embed codes on an h x w grid of size x size pixel crops, `classes`
    class tokens): every count an integer >= its minimum and size a multiple of h and w."""
    if not isinstance(layout, dict):
        raise ValueError(f"{where}: 'layout' is a {type(layout).__name__}, expected a dict")
    for key, minimum in _LAYOUT_KEYS.items():
        value = layout.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{where}: layout[{key!r}] must be an integer >= {minimum}, got {value!r}")
    if layout["size"] % layout["h"] or layout["size"] % layout["w"]:
        raise ValueError(f"{where}: layout size {layout['size']} is not a multiple of its code grid "
                         f"{layout['h']} x {layout['w']}")
    return layout


def load_weights(module: torch.nn.Module, state_dict, path, what: str = "model") -> torch.nn.Module:
    """module.load_state_dict(state_dict), with a checkpoint whose tensors do not fit the model its
    own config describes refused in one line naming the file and the first mismatch (torch's
    message runs to a line per tensor)."""
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path}: damaged checkpoint: the {what} weights are a {type(state_dict).__name__}, "
                         f"expected a dict")
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as e:
        problems = [line.strip().rstrip(".") for line in str(e).splitlines()[1:] if line.strip()]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        first = problems[0] if problems else _first_line(e)
        raise ValueError(f"{path}: damaged checkpoint: the {what} weights do not fit the {type(module).__name__} "
                         f"its config describes: {first}{more}") from None
    return module


def resume_path(out_dir, resume) -> Path | None:
    """The checkpoint a run should resume from, or None to start fresh.

    resume None / False: None. True / "auto": out_dir/last.ckpt when it exists, else None (so the
    same command starts a run and continues it after a kill). A path: that file, or that
    directory's last.ckpt; FileNotFoundError if there is none.
    """
    if resume is None or resume is False:
        return None
    if resume is True or resume == "auto":
        candidate = Path(out_dir) / LAST_CHECKPOINT
        return candidate if candidate.is_file() else None
    if not isinstance(resume, (str, os.PathLike)):
        raise ValueError(f"resume must be None, True, 'auto' or a path, got {resume!r}")
    candidate = Path(resume)
    if candidate.is_dir():
        candidate = candidate / LAST_CHECKPOINT
    if not candidate.is_file():
        raise FileNotFoundError(f"resume: no checkpoint at {candidate}")
    return candidate


def seed_rng(seed: int) -> None:
    """Seed every global generator capture_rng_state saves: torch's (CPU and CUDA), numpy's and
    python's, so that a run is a function of its seed whichever of them its code draws from."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


def capture_rng_state(generators: dict | None = None) -> dict:
    """The torch (CPU and every CUDA device), numpy and python RNG states, as tensors, and the states
    of the named torch.Generators a run keeps of its own ({name: generator}) under "generators"."""
    numpy_state = np.random.get_state(legacy=False)
    if numpy_state["bit_generator"] != "MT19937":  # np.random.seed always installs MT19937
        raise ValueError(f"capture_rng_state: numpy's global generator is {numpy_state['bit_generator']}, "
                         f"expected MT19937")
    version, python_words, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "python": {"version": version, "state": torch.tensor(python_words, dtype=torch.int64), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generators:
        state["generators"] = {name: generator.get_state() for name, generator in generators.items()}
    return state


def restore_rng_state(state: dict, generators: dict | None = None) -> list[str]:
    """Undo capture_rng_state: the global generators, and those of `generators` ({name: generator})
    that the state holds; returns the names it does not hold (left as they are). CUDA states are
    restored for the devices present in both runs and ignored when this run has no CUDA (a GPU run
    resumed on a CPU)."""
    torch.set_rng_state(state["torch"].cpu())
    numpy_state = state["numpy"]
    np.random.set_state({
        "bit_generator": "MT19937",
        "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": int(numpy_state["pos"])},
        "has_gauss": int(numpy_state["has_gauss"]),
        "gauss": float(numpy_state["gauss"]),
    })
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), device)
    saved = state.get("generators", {})
    missing = []
    for name, generator in (generators or {}).items():
        if name in saved:
            generator.set_state(saved[name].cpu())
        else:
            missing.append(name)
    return missing


def gather_rng_states(generators: dict | None = None) -> list[dict] | None:
    """capture_rng_state(generators) of every process, in rank order, on rank 0 (None on the others);
    without torch.distributed, [this process's]. Every process must call it (a collective)."""
    import torch.distributed as dist

    mine = capture_rng_state(generators)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    everyone = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, everyone, dst=0)
    return everyone


def training_state(kind: str, config: dict, step: int, parts: dict, *, rng: list[dict] | None = None,
                   **extra) -> dict:
    """What a train-* command's last.ckpt holds: its kind, config and step, the state dict of every
    part (models, losses, optimizers, the TrainBatches position, by name), the RNG states and the
    `extra` entries, so --resume continues the run exactly (resume_training, restore_training_rng).

    rng: every process's RNG states in rank order (gather_rng_states); default this process's alone.
    "rng" holds rank 0's and, with several processes, "rng_ranks" all of them.
    """
    rng = [capture_rng_state()] if rng is None else list(rng)
    state = {"kind": kind, "config": config, "step": step, "rng": rng[0],
             **{name: part.state_dict() for name, part in parts.items()}, **extra}
    if len(rng) > 1:
        state["rng_ranks"] = rng
    return state


def resume_training(path, kind: str, config: dict, parts: dict, map_location="cpu", *,
                    optional: tuple = ()) -> dict:
    """Load a training_state from path into parts (same names) and return the whole state (its
    "step", RNG states and extra entries). Refuses a checkpoint of another command or with another
    model config (before touching parts). Parts named in `optional` may be missing (a checkpoint
    of an older version): they are left as they are; the caller sees their absence in the state.

    The RNGs are not restored here: a run seeds its generators and builds what draws from them
    first, then calls restore_training_rng(state, ...) just before its first step."""
    state = load_checkpoint(path, map_location=map_location)
    if state.get("kind") != kind:
        raise ValueError(f"--resume: {path} is not a {kind} checkpoint (kind {state.get('kind')!r})")
    if state["config"]["model"] != config["model"]:
        raise ValueError(f"--resume: {path} was trained with a different model config; resume with its config")
    missing = [name for name in parts if name not in state and name not in optional]
    if missing:
        raise ValueError(f"--resume: {path} lacks {', '.join(missing)}")
    for name, part in parts.items():
        if name in state:
            if isinstance(part, torch.nn.Module):
                load_weights(part, state[name], path, name)
            else:
                part.load_state_dict(state[name])
    return state


def restore_training_rng(state: dict, generators: dict | None = None, rank: int = 0,
                         world_size: int = 1) -> list[str]:
    """Restore the RNG states of resume_training's `state` for process `rank` of `world_size`:
    its own when the checkpoint holds every rank's ("rng_ranks") for the same number of processes,
    else rank 0's. Returns warnings (empty when the continuation is exact): RNG states saved by a
    different number of processes, or generators the checkpoint does not hold (left as seeded)."""
    warnings = []
    ranks = state.get("rng_ranks")
    rng = state["rng"]
    if ranks is not None and len(ranks) == world_size:
        rng = ranks[rank]
    elif world_size > 1 or ranks is not None:
        saved = len(ranks) if ranks is not None else 1
        warnings.append(f"the checkpoint holds the RNG states of {saved} process(es), this run has {world_size}: "
                        f"every process continues from rank 0's, so random draws differ from the uninterrupted run")
    missing = restore_rng_state(rng, generators)
    if missing:
        warnings.append(f"the checkpoint predates the state of the generator(s) {', '.join(missing)}: they start "
                        f"afresh, so random draws differ from the uninterrupted run")
    return warnings
