"""Shared Streamlit helpers: the job registry, cached model loaders, the sidebar model picker, presentation mode,
image grids and errors. Pages import from here; nothing here is copied per page.

Caching: models with st.cache_resource keyed by (checkpoint path, modification time, device) or (run id, weights
version, device); arrays with st.cache_data keyed by the model's cache key.
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import streamlit as st
import torch

from vae import CheckpointError, DatasetUnavailable, load_dataset
from vae.checkpoint import list_checkpoints, model_from_checkpoint, read_checkpoint, save_checkpoint
from vae.config import ModelConfig
from vae.device import available_devices, resolve_device
from vae.jobs import JobRegistry
from vae.model import VAE

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINTS = ROOT / "checkpoints"
SHIPPED_DIRS = (CHECKPOINTS, CHECKPOINTS / "sweep")
USER_DIR = Path(os.environ.get("VAE_USER_CHECKPOINTS", CHECKPOINTS / "user"))
AUTOSAVE_DIR = Path(os.environ.get("VAE_AUTOSAVE_DIR", CHECKPOINTS / "autosave"))
DEFAULT_MODEL = "file:checkpoints/digits-z2.pt"
MAX_NAME = 64
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,%d}$" % (MAX_NAME - 1))


# ---- the process-wide job registry -------------------------------------------------------------------------------
@st.cache_resource
def get_registry() -> JobRegistry:
    return JobRegistry(autosave_dir=AUTOSAVE_DIR)


# ---- models ------------------------------------------------------------------------------------------------------
def xsrf_identity(cookie: str | None) -> str | None:
    """A stable id of a browser from Streamlit's XSRF cookie ("2|mask|masked token|time", hex): the token unmasked
    stays the same across reloads of the same browser and differs between browsers; its SHA-256 (so the token
    itself is never kept). None for a missing or unexpected cookie."""
    parts = (cookie or "").split("|")
    if len(parts) != 4 or parts[0] != "2":
        return None
    try:
        mask, masked = bytes.fromhex(parts[1]), bytes.fromhex(parts[2])
    except ValueError:
        return None
    if not mask or not masked:
        return None
    token = bytes(b ^ mask[i % len(mask)] for i, b in enumerate(masked))
    return hashlib.sha256(token).hexdigest()[:32]


def browser_id() -> str | None:
    """This browser's id (xsrf_identity), or None where there is no XSRF cookie (protection off, or a test run)."""
    try:
        return xsrf_identity(st.context.cookies.get("_streamlit_xsrf"))
    except Exception:  # no request context (AppTest, a script run outside a server)
        return None


def claim(job_id: str) -> None:
    """This session controls the run from now on (it started it, or took it over)."""
    st.session_state.setdefault("_own_runs", set()).add(job_id)


def owns(job) -> bool:
    """Whether this browser controls the run: a shared link or the run list shows anyone's runs, and a run started
    in another browser session is watch-only there until taken over. Its session started it (or took it over), or
    the same browser did before a reload (browser_id, where the browser has Streamlit's XSRF cookie)."""
    if job.id in st.session_state.get("_own_runs", set()):
        return True
    me = browser_id()
    return me is not None and job.owner == me


def file_stamp(path) -> tuple:
    """What says a file changed, for cache keys: its modification and status-change times in ns, size and inode (a
    file copied over with its old modification time kept, as `cp -p` and `rsync -a` do, has a new change time)."""
    st_ = Path(path).stat()
    return (st_.st_mtime_ns, st_.st_ctime_ns, st_.st_size, st_.st_ino)


@st.cache_resource(max_entries=32, show_spinner=False)
def _load_file_model(path: str, stamp: tuple, device: str):
    """Keyed by path + modification stamp (file_stamp) + device: a changed file is reloaded, never served
    stale."""
    ckpt = read_checkpoint(path)
    model = model_from_checkpoint(ckpt, path).to(device).eval()
    info = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return model, info


@st.cache_resource(max_entries=8, show_spinner=False)
def _load_run_model(run_id: str, version: int, device: str, _config: dict, _state: dict):
    model = VAE(ModelConfig.from_dict(_config))
    model.load_state_dict(_state)
    return model.to(device).eval()


@dataclass
class Selection:
    ref: str  # "file:<path relative to the repo>" or "run:<id>"
    label: str
    model: VAE | None = None
    info: dict = field(default_factory=dict)  # dataset, train_config, history, metrics, ...
    key: str = ""  # identifies these exact weights: a cache key for derived arrays
    device: str = "cpu"
    job: object | None = None  # the vae.jobs.Job for live runs
    error: str | None = None

    @property
    def dataset(self) -> str:
        return self.info.get("dataset") or "digits"

    @property
    def config(self) -> ModelConfig | None:
        return self.model.config if self.model is not None else None


def file_ref(path: Path) -> str:
    try:
        return "file:" + path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return "file:" + str(path)


def safe_checkpoint_path(ref: str) -> Path:
    """The file a file: ref names, refusing anything outside checkpoints/ (refs come from URLs)."""
    rel = ref[len("file:"):]
    p = (ROOT / rel).resolve()
    allowed = [CHECKPOINTS.resolve(), USER_DIR.resolve()]
    if not any(p == a or a in p.parents for a in allowed) or p.suffix != ".pt":
        raise ValueError(f"model {rel!r} is not a checkpoint inside checkpoints/: pick one from the list")
    return p


@st.cache_resource(max_entries=16, show_spinner=False)
def _list_checkpoints_cached(folder: str, signature: tuple):
    return list_checkpoints(folder)


def checkpoints_in(folder: Path):
    """list_checkpoints(folder), re-read only when a .pt file there is added, removed or changed: reading every
    file's metadata costs ~0.1 s per file, and the sidebar needs the list on every rerun of every page."""
    files = sorted(folder.glob("*.pt")) if folder.is_dir() else []
    signature = tuple((p.name, *file_stamp(p)) for p in files if p.is_file())
    return _list_checkpoints_cached(str(folder), signature)


def model_options() -> dict[str, str]:
    """ref -> label for every model the picker offers, what the user made first (the newest at the top): live
    runs, then saved and uploaded checkpoints, then the shipped ones."""
    opts: dict[str, str] = {}
    for job in reversed(get_registry().jobs()):
        if job.has_weights:  # live runs, and runs restored from an autosave after a server restart
            # the label goes into the URL (bind="query-params"), so it must not change while the run goes on
            opts[f"run:{job.id}"] = f"run: {job.name} ({job.id})" if job.name != job.id else f"run: {job.id}"
    saved = [s for s in checkpoints_in(USER_DIR) if s.error is None]
    for s in sorted(saved, key=lambda s: _mtime(s.path), reverse=True):
        opts[file_ref(Path(s.path))] = f"saved: {s.name}"
    for folder in SHIPPED_DIRS:
        for s in checkpoints_in(folder):
            if s.error is None:
                opts[file_ref(Path(s.path))] = f"shipped: {Path(s.path).relative_to(CHECKPOINTS).with_suffix('')}"
    return opts


def _mtime(path) -> float:
    try:
        return Path(path).stat().st_mtime
    except OSError:
        return 0.0


def load_selection(ref: str, device: str) -> Selection:
    """Load what a ref names. Errors come back in Selection.error (one line), never raised."""
    try:
        if ref.startswith("run:"):
            job = get_registry().get(ref[4:])
            if job is None:
                raise ValueError(f"run {ref[4:]!r} is not on this server (it may have been removed); pick another")
            w = job.latest_weights()
            if w is None:
                raise ValueError(f"run {job.name!r} has no weights yet: wait for it to start")
            cfg, state, version = w
            model = _load_run_model(job.id, version, device, cfg, state)
            snap = job.snapshot()
            info = {"dataset": snap.train_config.get("dataset"), "train_config": snap.train_config,
                    "history": snap.history, "metrics": {}, "model_config": cfg}
            return Selection(ref, f"run: {job.name}", model, info, f"run:{job.id}:{version}:{device}", device, job)
        path = safe_checkpoint_path(ref)
        if not path.is_file():
            raise ValueError(f"checkpoint {path.name} no longer exists; pick another model")
        stamp = file_stamp(path)
        model, info = _load_file_model(str(path), stamp, device)
        return Selection(ref, path.stem, model, info, f"{path}:{':'.join(map(str, stamp))}:{device}", device)
    except (ValueError, CheckpointError) as exc:
        return Selection(ref, ref, error=str(exc), device=device)


# ---- datasets ----------------------------------------------------------------------------------------------------
_UNAVAILABLE: dict = {}  # (name, split, binarize) -> (time, message): a failed download is not retried every rerun
RETRY_DOWNLOAD_S = 120


def get_dataset(name: str, split: str = "test", binarize: bool = False):
    """(dataset, None) or (None, one-line message). Never raises for a missing dataset."""
    import time

    key = (name, split, binarize)
    failed = _UNAVAILABLE.get(key)
    if failed and time.time() - failed[0] < RETRY_DOWNLOAD_S:
        return None, failed[1]
    try:
        return load_dataset(name, split, binarize=binarize), None
    except DatasetUnavailable as exc:
        _UNAVAILABLE[key] = (time.time(), str(exc))
        return None, str(exc)
    except ValueError as exc:
        return None, str(exc)


def selection_data(sel: Selection, split: str = "test"):
    tc = sel.info.get("train_config") or {}
    return get_dataset(sel.dataset, split, bool(tc.get("binarize", False)))


# ---- images ------------------------------------------------------------------------------------------------------
def to_images(x, shape) -> np.ndarray:
    """(N, D) in [0, 1] -> (N, H, W) uint8."""
    x = x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
    return (np.clip(x, 0, 1).reshape(len(x), *shape) * 255).round().astype(np.uint8)


def tile(x, shape, ncols: int = 8, pad: int = 1, scale: int | None = None, target_px: int = 640) -> np.ndarray:
    """A grid image of N examples, upscaled by an integer factor with nearest-neighbour pixels (crisp, no blur)."""
    imgs = to_images(x, shape)
    n, h, w = imgs.shape
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad), 80, np.uint8)
    for i, im in enumerate(imgs):
        r, c = divmod(i, ncols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = im
    scale = scale or max(1, target_px // grid.shape[1])
    return np.kron(grid, np.ones((scale, scale), np.uint8))


def upscale(img: np.ndarray, target_px: int = 320) -> np.ndarray:
    s = max(1, target_px // max(img.shape[:2]))
    return np.kron(img, np.ones((s, s), np.uint8))


def quoted(value, limit: int | None = None) -> str:
    """What a user typed (or a link carried), quoted for a message: repr, cut to limit characters, with the
    characters Markdown acts on escaped (a run name "**bold**" came back bold, its asterisks gone)."""
    text = str(value)
    if limit is not None and len(text) > limit:
        text = text[:limit] + "…"
    return re.sub(r"([*_`\[\]~$<>#|])", r"\\\1", repr(text))


# ---- checkpoint names and uploads ------------------------------------------------------------------------------
def validate_name(name: str) -> str:
    """A checkpoint name that cannot leave checkpoints/user: letters, digits, . _ - only."""
    name = (name or "").strip()
    if name.endswith(".pt"):
        name = name[:-3]
    if len(name) > MAX_NAME:  # told, not cut: a text box's max_chars drops a longer paste without a word
        raise ValueError(f"the name {quoted(name, 24)} is {len(name)} characters long: at most {MAX_NAME} are "
                         "allowed (ASCII letters, digits, '.', '_' or '-')")
    if not NAME_RE.match(name) or ".." in name:
        raise ValueError(f"name {quoted(name)} is not allowed: use 1-{MAX_NAME} ASCII letters (a-z, A-Z), digits, '.', "
                         "'_' or '-', starting with a letter or digit")
    return name


def save_user_checkpoint(name: str, ckpt: dict, overwrite: bool = False) -> Path:
    name = validate_name(name)
    path = USER_DIR / f"{name}.pt"
    taken = ValueError(f"a checkpoint named {name!r} already exists: choose another name or tick overwrite")
    if path.exists() and not overwrite:
        raise taken
    try:  # without overwrite, a file of that name saved meanwhile (another session) is never replaced
        return save_checkpoint(path, ckpt, replace=overwrite)
    except FileExistsError:
        if path.exists():
            raise taken from None
        raise  # not the checkpoint: its folder's name is taken by a file (an OSError for the caller)


def upload_name(filename: str) -> str:
    """A checkpoint name from an uploaded file's name: "mine (1).pt" (a browser's second download) -> "mine-1";
    ValueError if nothing usable is left."""
    stem = Path(filename or "").name
    stem = stem[:-3] if stem.lower().endswith(".pt") else stem
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).replace("..", ".").strip("-._")[:MAX_NAME].rstrip("-._")
    return validate_name(stem or "upload")


def free_name(name: str) -> str:
    """name, or name-2, name-3, ... : the first that no checkpoint in checkpoints/user has."""
    if not (USER_DIR / f"{name}.pt").exists():
        return name
    for i in range(2, 10_000):
        cand = f"{name[:MAX_NAME - len(str(i)) - 1]}-{i}"
        if not (USER_DIR / f"{cand}.pt").exists():
            return cand
    raise ValueError(f"too many checkpoints named {name!r}-N: rename the file")


def _same_file(name: str, data: bytes) -> Path | None:
    """The checkpoint in checkpoints/user that holds exactly these bytes under name or name-N, if one does."""
    pattern = re.compile(re.escape(name) + r"(-\d+)?")
    for p in sorted(USER_DIR.glob(f"{glob.escape(name)}*.pt")):
        try:
            if pattern.fullmatch(p.stem) and p.is_file() and p.stat().st_size == len(data) and p.read_bytes() == data:
                return p
        except OSError:
            continue
    return None


def accept_upload(filename: str, data: bytes) -> tuple[Path, str | None]:
    """Validate an uploaded checkpoint (weights_only) in a temp file; only a good one is kept in checkpoints/user.
    Nothing saved is ever replaced: a file of the same name and other content is kept under the next free name
    (name-2, ...). The file is kept as uploaded (its bytes), so the same file uploaded again is recognised and not
    kept twice. Returns (path, a note saying so, or None)."""
    import tempfile

    name = upload_name(filename)
    USER_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(prefix=".upload-", suffix=".tmp", dir=USER_DIR, delete=False) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        tmp = Path(f.name)
    try:
        try:
            ckpt = read_checkpoint(tmp)
            model_from_checkpoint(ckpt, filename)
        except CheckpointError as exc:
            raise CheckpointError(str(exc).replace(str(tmp), filename)) from None
        same = _same_file(name, data)
        if same is not None:  # the very same file again (kept as name.pt, or as name-2.pt beside another)
            return same, (None if same.stem == name else f"this file was uploaded before: it is {same.stem!r}")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as save_checkpoint's files (mkstemp makes 0600)
        while True:
            kept = free_name(name)
            try:  # a link fails if the name was taken meanwhile (a rename would replace that file)
                os.link(tmp, USER_DIR / f"{kept}.pt")
                break
            except FileExistsError:
                continue
    finally:
        tmp.unlink(missing_ok=True)
    note = (f"a different checkpoint named {name!r} was already saved; this one is kept as {kept!r}"
            if kept != name else None)
    given = Path(filename or "").name
    if note is None and given.removesuffix(".pt").removesuffix(".PT") != kept:  # "name with spaces & ü.pt"
        note = (f"{quoted(given, 40)} is kept as {kept!r}: a checkpoint name takes ASCII letters, digits, '.', '_' "
                "and '-'")
    return USER_DIR / f"{kept}.pt", note


# ---- presentation mode -------------------------------------------------------------------------------------------
PRESENT_CSS = """
<style>
/* Presentation mode: the content (text, formulas, figures, numbers) grows; the controls keep their size, so rows of
   buttons and narrow columns still fit (a bigger root font made every widget bigger and cut their labels). */
[data-testid="stMainBlockContainer"], .block-container { max-width: 100% !important; padding-top: 1rem !important;
  padding-left: 2.5rem !important; padding-right: 2.5rem !important; }
[data-testid="stMain"] [data-testid="stMarkdown"] p, [data-testid="stMain"] [data-testid="stMarkdown"] li,
[data-testid="stMain"] [data-testid="stAlert"] p { font-size: 1.4rem; line-height: 1.55; }
[data-testid="stMain"] [data-testid="stCaptionContainer"], [data-testid="stMain"] [data-testid="stCaptionContainer"] p
  { font-size: 1.1rem !important; }
h1 { font-size: 2.9rem !important; } h2 { font-size: 2.2rem !important; } h3 { font-size: 1.75rem !important; }
.katex { font-size: 1.3em !important; }
[class*="st-key-lab_title_"] { min-height: 4.6rem; }  /* the Collapse lab's run names, two lines of the larger text */
.katex-display > .katex { font-size: 1.55em !important; }  /* display formulas (st.latex) as large as the text */
.st-key-stack_home > [data-testid="stLayoutWrapper"] > [data-testid="stHorizontalBlock"] > [data-testid="stColumn"]
  { min-width: 38rem !important; }
[class*="st-key-stack_elbo_"] > [data-testid="stLayoutWrapper"] > [data-testid="stHorizontalBlock"]
  > [data-testid="stColumn"]:first-child { min-width: 44rem !important; }
/* Trade-off: the plane over the whole width and its explanation under it, rather than a column of a few words a line */
.st-key-stack_rd > [data-testid="stLayoutWrapper"] > [data-testid="stHorizontalBlock"] > [data-testid="stColumn"]
  { min-width: 26rem !important; }
[data-testid="stMetricValue"], [data-testid="stMetricValue"] p { font-size: 2.5rem !important; }
[data-testid="stMetricLabel"] p { font-size: 1.1rem !important; }
header[data-testid="stHeader"], [data-testid="stToolbar"], footer { display: none !important; }
</style>
"""
# Pairs of widgets side by side inside a column (the Train page's options) wrap onto two rows where the column is too
# narrow for both (a 1024 px window with the sidebar open), rather than cutting their values to three letters.
BASE_CSS = """<style>
img { image-rendering: pixelated; image-rendering: crisp-edges; }
[data-testid="stColumn"] [data-testid="stHorizontalBlock"] { flex-wrap: wrap; }
[data-testid="stColumn"] [data-testid="stHorizontalBlock"] > [data-testid="stColumn"] { min-width: 7.5rem; }
/* st.container(key="stack_…").columns(…): side by side only where each column gets its min-width, else stacked */
[class*="st-key-stack_"] > [data-testid="stLayoutWrapper"] > [data-testid="stHorizontalBlock"] { flex-wrap: wrap; }
[class*="st-key-stack_"] > [data-testid="stLayoutWrapper"] > [data-testid="stHorizontalBlock"]
  > [data-testid="stColumn"] { min-width: 20rem; }
.st-key-stack_home > [data-testid="stLayoutWrapper"] > [data-testid="stHorizontalBlock"] > [data-testid="stColumn"]
  { min-width: 24rem; }
.st-key-stack_rd > [data-testid="stLayoutWrapper"] > [data-testid="stHorizontalBlock"] > [data-testid="stColumn"]
  { min-width: 17rem; }
.st-key-stack_lab_runs > [data-testid="stLayoutWrapper"] > [data-testid="stHorizontalBlock"] > [data-testid="stColumn"]
  { min-width: 9rem; max-width: 18rem; }  /* a run wrapped onto a row of its own keeps a run's width */
[class*="st-key-lab_title_"] { min-height: 3.3em; }  /* one- and two-line run names: the heatmaps below stay level */
.st-key-stack_liveopts > [data-testid="stLayoutWrapper"] > [data-testid="stHorizontalBlock"] > [data-testid="stColumn"]
  { min-width: 9rem; }
[class*="st-key-stack_elbo_"] > [data-testid="stLayoutWrapper"] > [data-testid="stHorizontalBlock"]
  > [data-testid="stColumn"] { min-width: 14rem; }
[class*="st-key-stack_elbo_"] > [data-testid="stLayoutWrapper"] > [data-testid="stHorizontalBlock"]
  > [data-testid="stColumn"]:first-child { min-width: 30rem; }
.katex-display { overflow-x: auto; overflow-y: hidden; padding-bottom: 0.2rem; }  /* never cut off */
/* a long metric label wraps instead of ending in "…" ("log p_θ(x), importance sampling, K = 5000 (nats)") */
[data-testid="stMetricLabel"] [data-testid="stMarkdownContainer"], [data-testid="stMetricLabel"] p
  { white-space: normal !important; overflow: visible !important; text-overflow: clip !important; }
</style>"""


def check_range(label: str, value, lo, hi) -> None:
    """ValueError, one line, for a number outside [lo, hi] (or none). The pages' number boxes that feed a run take
    any value and are checked with this when the run is asked for: a browser refuses a value outside a box's own
    min/max with only a small red mark and keeps sending the old one, so the run would use a number no longer on
    screen."""
    def num(v) -> str:  # 1,000,000 and 2,147,483,647 for whole numbers, 1e-06 and 0.5 for the others
        return f"{v:,}" if isinstance(v, int) else f"{v:g}"

    if value is None:
        raise ValueError(f"{label} is empty: type a number from {num(lo)} to {num(hi)}")
    if not lo <= value <= hi:
        raise ValueError(f"{label} = {num(value)} is out of range: use a number from {num(lo)} to {num(hi)}")


def nats2(v: float) -> str:
    """A value in nats with two decimals, never "-0.00": a Monte Carlo estimate of a quantity >= 0 that comes out a
    hair below zero shows as 0.00 (one further below is shown as it is: the estimate's error). From a million on,
    three significant digits ("-5.74e+24"): a diverged run's figures, which in full overflow a metric's box."""
    if abs(v) >= 1e6 or v != v:
        return f"{v:.3g}"
    return "0.00" if -0.005 < v < 0.005 else f"{v:.2f}"


def clamped(label: str, value, lo, hi, where=st):
    """value brought into [lo, hi], with a one-line note under the box when it had to be: for the number boxes of
    an interactive view (no run to refuse), which take any number for the same reason as check_range's."""
    if value is None:
        value = lo
    if lo <= value <= hi:
        return value
    near = lo if value < lo else hi
    where.caption(f":orange[{label} {value:,} is outside {lo:,} to {hi:,}: showing {near:,}]")
    return near


PRESENT_ON, PRESENT_OFF = ("1", "yes", "on", "y"), ("0", "no", "off", "n")  # spellings ?present= also takes


def presenting() -> bool:
    return bool(st.session_state.get("present", False))


PRESENT_TICK_PX, PRESENT_AXIS_TITLE_PX = 17, 19  # Plotly's axes in presentation mode (its theme's are ~11 px)
PRESENT_TITLE_PX = 22  # ... and figure titles


def style_fig(fig, height: int | None = None):
    """Common Plotly styling; bigger type in presentation mode (the axes' too: Streamlit's Plotly theme sets their
    fonts, so they do not follow the layout's)."""
    big = presenting()
    fig.update_layout(font=dict(size=20 if big else 13), margin=dict(l=10, r=10, t=50, b=10),
                      legend=dict(font=dict(size=18 if big else 12)))
    if big:
        for update in (fig.update_xaxes, fig.update_yaxes):
            update(tickfont_size=PRESENT_TICK_PX, title_font_size=PRESENT_AXIS_TITLE_PX)
        # the figure's title and its annotations (subplot titles, line labels) as well: each carries its own size
        fig.update_layout(title_font_size=PRESENT_TITLE_PX)
        fig.update_annotations(font_size=PRESENT_AXIS_TITLE_PX)
    if height:
        fig.update_layout(height=int(height * (1.25 if big else 1)))
    return fig


def expander(label: str, key: str, *, open_for: tuple | None = None, expanded: bool = False, where=st, **kw):
    """A keyed expander whose open/closed state the server knows (`st.session_state[key]`), so that it stays as the
    user left it across reruns and across visits to other pages (Streamlit drops a widget's state on a page that
    does not draw it, so a copy is kept under `_open_<key>`). `open_for=(token, want_open)`: whenever `token`
    changes, the expander is put in the `want_open` state once, e.g. the Save panel opens when a run ends, and a
    user who closes it again is not overruled by the next rerun. Opening or closing it reruns the page. `where`: the
    container to draw it in (st, a column, the sidebar)."""
    shadow, token = f"_open_{key}", f"_open_for_{key}"
    if open_for is not None and (token not in st.session_state or st.session_state[token] != open_for[0]):
        st.session_state[token] = open_for[0]
        st.session_state[key] = bool(open_for[1])
    elif key not in st.session_state and shadow in st.session_state:
        st.session_state[key] = st.session_state[shadow]
    box = where.expander(label, expanded=expanded, key=key, on_change="rerun", **kw)
    st.session_state[shadow] = bool(box.open)
    return box


# ---- the sidebar ---------------------------------------------------------------------------------------------------
@st.cache_resource
def warm_imports() -> bool:
    """Import scikit-learn's PCA and t-SNE in the background once per server, so that the first Latent-space
    projection does not wait for the one-time import (1-3 s on a small CPU). app.py calls it after the first page
    has rendered, so it does not delay the cold start."""
    import importlib
    import threading

    # scikit-learn imports pandas, and Plotly's validators look pandas up in sys.modules without importing it: a
    # page run drawing a figure while the thread below is half-way through pandas' import got the partially
    # initialised module (AttributeError: ... has no attribute 'Series'). Imported here, in the script's thread
    # (0.2 s, after the page has rendered), the thread never leaves a half-imported module that a page peeks at.
    import pandas  # noqa: F401

    def run():
        for name in ("sklearn.decomposition", "sklearn.manifold"):
            importlib.import_module(name)

    threading.Thread(target=run, name="vae-warm-imports", daemon=True).start()
    return True


def sidebar() -> Selection:
    """Draw the model, device and presentation controls (bound to the URL) and return the selected model."""
    # first, before anything is drawn or decided: the rerun would lose the notes about the rest of the URL
    flag = str(st.query_params.get("present", "")).strip().lower()
    if flag in PRESENT_ON or flag in PRESENT_OFF:  # ?present=1 / yes / on: the binding reads only true/false
        st.query_params["present"] = "true" if flag in PRESENT_ON else "false"
        st.rerun()
    opts = model_options()
    if DEFAULT_MODEL in opts:  # the widget's default (first option) must be the app's default: bind drops it from
        opts = {DEFAULT_MODEL: opts[DEFAULT_MODEL], **opts}  # the URL, and a link without model= opens it
    if "_pending_model" in st.session_state:  # set by select_model() before this run's widgets exist
        st.session_state["model"] = st.session_state.pop("_pending_model")
    wanted = st.session_state.get("model") or st.query_params.get("model")
    if wanted not in opts:  # the URL holds the option's label (bind="query-params"), not the ref
        wanted = {label: r for r, label in opts.items()}.get(wanted, wanted)
    if wanted not in opts:
        if wanted:
            st.sidebar.warning(f"model {quoted(wanted, 60)} is not available on this server; showing a shipped model")
        wanted = DEFAULT_MODEL if DEFAULT_MODEL in opts else next(iter(opts), DEFAULT_MODEL)
    st.session_state["model"] = wanted
    with st.sidebar:
        ref = st.selectbox("Model", list(opts), format_func=lambda r: opts.get(r, r), key="model",
                           bind="query-params", help="Shipped checkpoints, ones you saved or uploaded, and live "
                                                     "training runs (their latest weights)")
        devices = ["auto", *available_devices()]
        if st.session_state.get("device") not in devices:
            asked = st.session_state.get("device") or st.query_params.get("device")
            if asked and asked not in devices:  # ?device=cuda on a machine without one: said, not dropped silently
                st.caption(f"device {quoted(asked, 20)} is not on this machine (it has {', '.join(devices[1:])}): "
                           "using auto")
            st.session_state["device"] = "auto"
        dev = st.selectbox("Device", devices, key="device", bind="query-params",
                           help="auto picks cuda, then mps, then cpu; only devices this machine has are listed")
        st.toggle("Presentation mode", key="present", bind="query-params",
                  help="Larger type and less chrome for a projector; add ?present=true to a link")
        if flag and flag not in (*PRESENT_ON, *PRESENT_OFF, "true", "false"):
            st.caption(f"?present={flag[:20]} is not understood: use ?present=true (or 1, yes, on) or false")
        with st.expander("Upload a checkpoint"):
            _upload_box()
        note = st.session_state.pop("_upload_note", None)
        if note:  # outside the expander: the rerun after an upload draws the sidebar with it closed
            st.info(note)
    st.html(BASE_CSS)
    if presenting():
        st.html(PRESENT_CSS)
    sel = load_selection(ref, str(resolve_device(dev)))
    if sel.error:
        st.sidebar.error(sel.error)
    return sel


def _upload_box():
    up = st.file_uploader("A .pt file saved by VAE Explorer", type=["pt"], key="upload")
    if up is None:
        return
    token = up.file_id  # each upload has its own (a retrained file can have the same name and size)
    if st.session_state.get("_upload_done") == token:
        return
    failed = st.session_state.get("_upload_failed")
    if failed and failed[0] == token:  # said again while it stays in the box, not checked again at every rerun
        st.error(failed[1])
        return
    try:
        path, note = accept_upload(up.name, up.getvalue())
    except (CheckpointError, ValueError) as exc:
        st.session_state["_upload_failed"] = (token, str(exc))
        st.error(str(exc))
        return
    st.session_state["_upload_done"] = token
    st.session_state["_upload_note"] = note
    select_model(file_ref(path))


def select_model(ref: str):
    """Make ref the selected model (from a button or an upload) and rerun."""
    st.session_state["_pending_model"] = ref
    st.rerun()


def need_model(sel: Selection) -> bool:
    """Show a clear message and return False when no usable model is selected."""
    if sel.model is None:
        st.info(sel.error or "Pick a model in the sidebar.")
        return False
    return True


def current() -> Selection:
    """The model chosen in the sidebar on this run (set by app.py before the page runs)."""
    sel = st.session_state.get("_selection")
    return sel if sel is not None else Selection(DEFAULT_MODEL, "none", error="Pick a model in the sidebar.")


@st.cache_data(max_entries=64, show_spinner=False)
def recon_and_samples(key: str, _model, x: np.ndarray | None, n_samples: int = 16, seed: int = 0):
    """Reconstructions of x (None when x is None) and prior samples, cached per model weights (key) and inputs."""
    with torch.inference_mode():
        recon = None
        if x is not None:
            recon = _model.reconstruct(torch.as_tensor(x, device=_model.device)).cpu().numpy()
        g = torch.Generator(device=_model.device).manual_seed(seed)
        samples = _model.sample(n_samples, generator=g).cpu().numpy()
    return recon, samples
