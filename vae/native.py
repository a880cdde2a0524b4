"""The fused MLP step in C (vae/native/fused_mlp.c), built on first use with the machine's C compiler.

An accelerator, never a requirement: where there is no compiler, the build fails, the torch build exports no BLAS
sgemm_, or VAE_NATIVE=0 is set, `library()` returns None and says why in `unavailable_reason()`, and vae.fused's
torch path runs instead (same loss and gradients; tests/test_native.py checks the two against each other and
against autograd).

The library is cached per source, compiler flags, compiler, CPU and torch (built for this CPU with -march=native),
under VAE_NATIVE_DIR or ~/.cache/vae-explorer/native (the temp folder if that cannot be made), written atomically
(a temp file, then a rename), so processes that start together do not see half a file.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("native") / "fused_mlp.c"
ABI_VERSION = 5
MAX_LAYERS = 34  # VAE_MAX_LAYERS in the C source
MAX_LATENT = 1024
BASE_FLAGS = ["-O3", "-fPIC", "-shared", "-fno-math-errno", "-std=c99"]
# tried in this order until one builds: tuned for this CPU with OpenMP for the elementwise passes, then less
ARCH_FLAGS = ["-march=native"] + (["-mprefer-vector-width=512"] if platform.machine() in ("x86_64", "AMD64") else [])
FLAG_SETS = [ARCH_FLAGS + ["-fopenmp"], ARCH_FLAGS, ["-fopenmp"], []]

WRONG_BLAS = "the BLAS sgemm_ gave a wrong product"

_lock = threading.Lock()
_state: dict = {}


class Net(ctypes.Structure):
    """vae_net in fused_mlp.c."""
    _fields_ = [("n_layers", ctypes.c_int), ("n_enc", ctypes.c_int), ("d", ctypes.c_int), ("D", ctypes.c_int),
                ("likelihood", ctypes.c_int), ("threads", ctypes.c_int), ("inv_var", ctypes.c_float),
                ("recon_const", ctypes.c_double), ("logvar_min", ctypes.c_float), ("logvar_max", ctypes.c_float),
                ("inp", ctypes.c_int * MAX_LAYERS), ("out", ctypes.c_int * MAX_LAYERS),
                ("W", ctypes.c_void_p * MAX_LAYERS), ("b", ctypes.c_void_p * MAX_LAYERS),
                ("gW", ctypes.c_void_p * MAX_LAYERS), ("gb", ctypes.c_void_p * MAX_LAYERS)]


class Adam(ctypes.Structure):
    """vae_adam in fused_mlp.c: Adam's state tensors of layer l's weight (2 l) and bias (2 l + 1), and its settings."""
    _fields_ = [("exp_avg", ctypes.c_void_p * (2 * MAX_LAYERS)), ("exp_avg_sq", ctypes.c_void_p * (2 * MAX_LAYERS)),
                ("step", ctypes.c_void_p * (2 * MAX_LAYERS)), ("lr", ctypes.c_double), ("beta1", ctypes.c_double),
                ("beta2", ctypes.c_double), ("eps", ctypes.c_double)]


def _cache_dir() -> Path:
    env = os.environ.get("VAE_NATIVE_DIR")
    if env:
        return Path(env)
    try:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    except RuntimeError:  # no home directory (a container's user with no passwd entry)
        base = Path(tempfile.gettempdir())
    return base / "vae-explorer" / "native"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _sgemm_address() -> int | None:
    """The address of the BLAS sgemm_ that torch's own matmuls use (libtorch_cpu exports it), or None."""
    lib_dir = Path(torch.__file__).parent / "lib"
    for path in sorted(lib_dir.glob("libtorch_cpu*")):
        try:
            fn = getattr(ctypes.CDLL(str(path)), "sgemm_")
        except (OSError, AttributeError):
            continue
        return ctypes.cast(fn, ctypes.c_void_p).value
    return None


def _open(path: str, sgemm: int) -> tuple[ctypes.CDLL | None, str]:
    """Load a built library and check it: its version, and a small product through the sgemm_ it is given."""
    try:
        lib = ctypes.CDLL(path)
        if lib.vae_abi_version() != ABI_VERSION:
            return None, "of another version"
    except (OSError, AttributeError) as e:
        return None, str(e).splitlines()[0]
    lib.vae_set_sgemm(ctypes.c_void_p(sgemm))
    lib.vae_gemm_selftest.restype = ctypes.c_double
    if lib.vae_gemm_selftest() != 0.0:
        return None, WRONG_BLAS
    lib.vae_has_openmp.restype = ctypes.c_int
    lib.vae_workspace_floats.argtypes = [ctypes.POINTER(Net), ctypes.c_int]
    lib.vae_workspace_floats.restype = ctypes.c_long
    dp = ctypes.POINTER(ctypes.c_double)
    lib.vae_fb.argtypes = [ctypes.POINTER(Net), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p,
                           ctypes.c_int, ctypes.c_void_p, ctypes.c_double, ctypes.c_double, ctypes.c_int,
                           ctypes.c_double, dp, ctypes.c_void_p]
    lib.vae_fb.restype = ctypes.c_int
    lib.vae_fb_steps.argtypes = [ctypes.POINTER(Net), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long,
                                 ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, dp, ctypes.c_double,
                                 ctypes.c_int, dp, dp, ctypes.c_void_p]
    lib.vae_fb_steps.restype = ctypes.c_int
    return lib, ""


def _build(cc: str, out: Path, sgemm: int) -> tuple[ctypes.CDLL | None, str]:
    """Compile SOURCE with the first of FLAG_SETS that gives a library that loads and checks out (one built with
    OpenMP may not find its runtime), put it at out, and return it loaded; or (None, the last complaint)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    err = "failed"
    for extra in FLAG_SETS:
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            proc = subprocess.run([cc, *BASE_FLAGS, *extra, str(SOURCE), "-o", tmp, "-lm"], capture_output=True,
                                  text=True, timeout=60)
            if proc.returncode != 0:
                lines = (proc.stderr or proc.stdout).strip().splitlines()
                err = lines[-1] if lines else f"exit status {proc.returncode}"
                continue
            lib, err = _open(tmp, sgemm)  # loaded under its temp name: a damaged file at out may be loaded already
            if lib is not None:
                os.replace(tmp, out)  # atomic: a process loading it meanwhile sees the whole file or none
                return lib, ""
        except (OSError, subprocess.SubprocessError) as e:
            err = str(e)
        finally:
            Path(tmp).unlink(missing_ok=True)
    return None, err


def _load() -> tuple[ctypes.CDLL | None, str | None]:
    if os.environ.get("VAE_NATIVE", "1").strip().lower() in ("0", "off", "no", "false"):
        return None, "VAE_NATIVE=0"
    if sys.platform.startswith("win"):
        return None, "not built on Windows"
    sgemm = _sgemm_address()
    if sgemm is None:
        return None, "this torch build exports no BLAS sgemm_"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler (cc, gcc or clang) on PATH"
    # the compiler named by where it really is and when it was installed (no `cc --version` run at every process
    # start); built for this CPU (-march=native): the key names it, and the host (a home shared by machines)
    real = os.path.realpath(cc)
    key = hashlib.sha256("\n".join([SOURCE.read_text(), repr(BASE_FLAGS), repr(FLAG_SETS), real,
                                    str(os.stat(real).st_mtime_ns), _cpu_flags(), platform.machine(),
                                    platform.node(), torch.__version__]).encode())
    name = f"fused_mlp-{key.hexdigest()[:16]}.so"
    path = _cache_dir() / name
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:  # a home without a writable cache: the temp folder, one per user
            user = os.getuid() if hasattr(os, "getuid") else 0
            path = Path(tempfile.gettempdir()) / f"vae-explorer-native-{user}" / name
    if path.exists():
        lib, err = _open(str(path), sgemm)
        if lib is not None:
            return lib, None
        if err == WRONG_BLAS:  # building again would not change that
            return None, err
    lib, err = _build(cc, path, sgemm)  # not built yet, or a cached file that does not load (damaged, foreign)
    if lib is None:
        return None, f"the C build failed ({err})"
    return lib, None


def library() -> ctypes.CDLL | None:
    """The loaded library (built the first time), or None: see unavailable_reason()."""
    with _lock:
        if "lib" not in _state:
            try:
                _state["lib"], _state["reason"] = _load()
            except Exception as e:  # noqa: BLE001  (an accelerator: whatever went wrong, the torch step runs)
                _state["lib"], _state["reason"] = None, f"{type(e).__name__}: {e}"
        return _state["lib"]


def unavailable_reason() -> str | None:
    """Why library() is None (None when it is not)."""
    library()
    return _state["reason"]
