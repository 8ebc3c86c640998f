"""Published VGG weights by name: `torchvision:vgg16` / `keras:vgg19` (and a bare torchvision
name, `vgg16`) wherever a weights directory is accepted (`--weights`, `train.init_from`,
`vgg_jax.pretrained("vgg16")` -> (model, variables, meta)); `weights.resolve` asks here.

The first use downloads the published file (progress bar), verifies its hash (torchvision:
the SHA-256 prefix in the file name, as torch.hub checks; Keras: the MD5 that
keras.applications checks), converts it once, and keeps the weights directory in the cache
(`~/.cache/vgg_jax/weights`; $VGG_JAX_CACHE or `train.weights_cache` move it); later uses
read the cache without network. Downloads and conversions are written under temporary
names and renamed into place, under a lock, so processes that start together (several
hosts on a shared cache, several processes on one) never see half a file. Offline, one
line names the URL and the file to place in the cache's downloads/ folder by hand; a file
placed there is verified and converted like a download. $VGG_JAX_WEIGHTS_URL replaces the
published base URL (mirrors, tests).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import shutil
import urllib.error
import urllib.request

from vgg_jax import convert, importers, store
from vgg_jax.errors import UserError

CACHE_ENV = "VGG_JAX_CACHE"      # the cache folder (its weights/ holds the converted weights)
URL_ENV = "VGG_JAX_WEIGHTS_URL"  # a base URL serving the published file names
TORCHVISION = "https://download.pytorch.org/models/"
KERAS = "https://storage.googleapis.com/tensorflow/keras-applications/"


@dataclasses.dataclass(frozen=True)
class Published:
    name: str           # source:name
    arch: str
    url: str
    digest: str         # sha256 prefix (torchvision) or md5 (Keras)
    include_top: bool
    preprocessing: str  # the pixel convention the weights expect (preprocess.normalization)
    top1: float | None  # the publisher's ImageNet validation accuracy, %, single 224 crop
    top5: float | None

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[1]

    @property
    def algorithm(self) -> str:
        return "md5" if self.name.startswith("keras:") else "sha256"


def _torchvision(arch, digest, top1, top5):
    return Published(f"torchvision:{arch}", arch, f"{TORCHVISION}{arch}-{digest}.pth", digest,
                     True, "torchvision", top1, top5)


def _keras(arch, top, md5, top1, top5):
    suffix = "" if top else "_notop"
    return Published(f"keras:{arch}{suffix}", arch,
                     f"{KERAS}{arch}/{arch}_weights_tf_dim_ordering_tf_kernels{suffix}.h5", md5,
                     top, "caffe", top1, top5)


# torchvision's weight enums (IMAGENET1K_V1: URL, acc@1, acc@5) and keras.applications'
# VGG16 / VGG19 (the paper's released Caffe weights; file_hash, and the top-1 / top-5
# that Keras' documentation table gives).
PUBLISHED = {p.name: p for p in [
    _torchvision("vgg11", "8a719046", 69.020, 88.628),
    _torchvision("vgg11_bn", "6002323d", 70.370, 89.810),
    _torchvision("vgg13", "19584684", 69.928, 89.246),
    _torchvision("vgg13_bn", "abd245e5", 71.586, 90.374),
    _torchvision("vgg16", "397923af", 71.592, 90.382),
    _torchvision("vgg16_bn", "6c64b313", 73.360, 91.516),
    _torchvision("vgg19", "dcbb9e9d", 72.376, 90.876),
    _torchvision("vgg19_bn", "c79401a0", 74.218, 91.842),
    _keras("vgg16", True, "64373286793e3c8b2b4e3219cbf3544b", 71.3, 90.1),
    _keras("vgg16", False, "6d6bbae143d832006294945121d1f1fc", None, None),
    _keras("vgg19", True, "cbe5617147190e668d6c5d5026f83318", 71.3, 90.0),
    _keras("vgg19", False, "253f8cb515780f3b799900260a226db6", None, None),
]}
SOURCES = ("torchvision", "keras")
_cache_override: str | None = None


def lookup(name: str) -> Published:
    """The published weights `name` means: 'torchvision:vgg16', 'keras:vgg19_notop', or a
    bare torchvision name ('vgg16'). Unknown names are refused with the list."""
    key = name if ":" in name else f"torchvision:{name}"
    if key not in PUBLISHED:
        raise UserError(f"no published weights named {name!r}; known: "
                        f"{', '.join(PUBLISHED)} (a bare name means torchvision's)")
    return PUBLISHED[key]


def is_name(value: str) -> bool:
    """Whether a --weights / init_from value names published weights (`source:name`, or a
    bare torchvision name such as `vgg16`) rather than a path: a path that exists is
    always a path."""
    if not isinstance(value, str) or os.path.exists(value):
        return False
    if ":" in value:
        return value.split(":", 1)[0] in SOURCES
    return f"torchvision:{value}" in PUBLISHED


def use_cache(directory: str | None) -> None:
    """Use `directory` as the cache for this process (the `train.weights_cache` config
    key); None or '' goes back to $VGG_JAX_CACHE or ~/.cache/vgg_jax."""
    global _cache_override
    _cache_override = directory or None


def cache_root() -> str:
    return os.path.abspath(os.path.expanduser(
        _cache_override or os.environ.get(CACHE_ENV) or
        os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "vgg_jax")))


def weights_dir(name: str, progress: bool = True) -> str:
    """The converted weights directory of published weights `name`, fetched, verified and
    converted on first use."""
    p = lookup(name)
    root = os.path.join(cache_root(), "weights")
    out = os.path.join(root, p.name.replace(":", "_"))
    if _complete(out):
        return out
    with fetched(p, progress) as path:
        if not _complete(out):  # another process may have converted it while this one waited
            _convert(p, path, out)
    return out


@contextlib.contextmanager
def fetched(p: Published, progress: bool = True, local: str | None = None):
    """The verified local copy of p's file (in the cache's downloads/, under a lock held
    while the block runs): downloaded on first use, or a copy found on this machine
    (`local`, e.g. one an installed package ships) or placed there by hand; a file whose
    digest is not the published one is refused, never used."""
    downloads = os.path.join(cache_root(), "weights", "downloads")
    os.makedirs(downloads, exist_ok=True)
    with _locked(os.path.join(downloads, f".{p.filename}.lock")):
        path = os.path.join(downloads, p.filename)
        if not os.path.exists(path) and local and os.path.isfile(local):
            shutil.copyfile(local, path + ".part")
            os.replace(path + ".part", path)
        if os.path.exists(path):  # placed by hand, or kept from an earlier download
            _verify(p, path, _digest(p, path), downloaded=False)
        else:
            _download(p, path, progress)
        yield path


def _complete(out: str) -> bool:
    return store.has_meta(out)


@contextlib.contextmanager
def _locked(path: str):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _hasher(p: Published):
    return hashlib.md5() if p.algorithm == "md5" else hashlib.sha256()


def _digest(p: Published, path: str) -> str:
    h = _hasher(p)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verify(p: Published, path: str, digest: str, downloaded: bool) -> None:
    if digest.startswith(p.digest):
        return
    if downloaded:
        os.remove(path)
        what = f"the download of {p.url} was deleted"
    else:  # placed by hand: kept aside, not deleted
        os.replace(path, path + ".rejected")
        what = f"{path} was moved to {path}.rejected"
    raise UserError(f"{p.filename} has {p.algorithm} {digest}, but {p.name} is published "
                    f"with {p.algorithm} {p.digest}{'...' if len(p.digest) < 32 else ''}: "
                    f"refused ({what})")


def _url(p: Published) -> str:
    base = os.environ.get(URL_ENV)
    return base.rstrip("/") + "/" + p.filename if base else p.url


def _download(p: Published, path: str, progress: bool) -> None:
    url = _url(p)
    part = f"{path}.part-{os.getpid()}"
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(part, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            h = _hasher(p)
            from tqdm import tqdm
            with tqdm(total=total, unit="B", unit_scale=True, desc=p.filename,
                      disable=not progress) as bar:
                for block in iter(lambda: r.read(1 << 20), b""):
                    f.write(block)
                    h.update(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError, ValueError) as e:
        if os.path.exists(part):
            os.remove(part)
        reason = getattr(e, "reason", None) or e
        raise UserError(f"cannot download {url} ({reason}); without network, place "
                        f"{p.filename} in {os.path.dirname(path)} by hand: it is verified "
                        f"and converted like a download") from None
    _verify(p, part, h.hexdigest(), downloaded=True)
    os.replace(part, path)


def _convert(p: Published, path: str, out: str) -> None:
    """Convert into a temporary directory beside `out`, then rename it into place."""
    if p.name.startswith("torchvision:"):
        sd = convert.load_state_dict(path)
        kw = convert.infer_model_kwargs(sd, p.arch)
        variables = convert.from_torch(sd, p.arch)
    else:
        variables, kw = importers.from_keras(path, p.arch, include_top=p.include_top)
    meta = convert.weights_meta(kw, p.preprocessing)
    meta["published"] = dict(name=p.name, url=p.url, file=p.filename,
                             **{p.algorithm: _digest(p, path)}, top1=p.top1, top5=p.top5)
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    store.save_weights(tmp, variables, meta)
    try:
        os.rename(tmp, out)
    except OSError:  # another host's conversion got there first: same weights
        shutil.rmtree(tmp, ignore_errors=True)
        if not _complete(out):
            raise


def main(*, names: list[str]) -> None:
    """`vgg-jax published [NAME ...]`: fetch the named weights into the cache (printing
    each directory), or list every name with its source, pixels, accuracy and whether it
    is cached."""
    for name in names:
        print(f"{lookup(name).name}: {weights_dir(name)}")
    if names:
        return
    root = os.path.join(cache_root(), "weights")
    print(f"{'name':<22} {'arch':<9} {'pixels':<12} {'top-1':>6} {'top-5':>6}  cached in {root}")
    for p in PUBLISHED.values():
        acc = (f"{p.top1:6.2f} {p.top5:6.2f}" if p.top1 is not None else f"{'-':>6} {'-':>6}")
        cached = "yes" if _complete(os.path.join(root, p.name.replace(":", "_"))) else "no"
        print(f"{p.name:<22} {p.arch:<9} {p.preprocessing:<12} {acc}  {cached}")
