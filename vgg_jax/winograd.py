"""Winograd's minimal filtering F(m x m, 3x3) (Lavin & Gray 2016) for VGG's 3x3 convs on
CPU: the transforms, the parts of the batch a conv runs over, and `winograd_conv3x3`, a
bilinear JAX primitive (so jvp, grad, vmap and their compositions all apply). `vgg_jax.conv` decides per layer
when to use it (`resolve_conv_impl`)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

# Winograd's minimal filtering F(m x m, 3x3) (Lavin & Gray 2016): an m x m output tile from
# an (m+2) x (m+2) input tile with (m+2)^2 products per channel pair instead of 9 m^2.
# (B^T, G, A^T) for m = 2 (2.25x fewer multiplies; coefficients 0, +-1, +-1/2) and m = 4
# (4x fewer; the paper's points 0, +-1, +-2, coefficients up to 8: float32 error ~1e-6
# relative, tests/test_conv_impl.py).
WINOGRAD = {
    2: (((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
        ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1)),
        ((1, 1, 1, 0), (0, 1, -1, -1))),
    4: (((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
         (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
        ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
         (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
        ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))),
}
WINOGRAD_IMPLS = {"winograd": 2, "winograd4": 4}  # conv_impl -> output tile size m


def _combine(matrix, items):
    """matrix @ items for a small constant matrix and a list of arrays, written as sums
    (zeros skipped, +-1 without a multiply) so that XLA fuses them into elementwise loops."""
    out = []
    for row in matrix:
        terms = [x if c == 1 else -x if c == -1 else x * c for c, x in zip(row, items) if c != 0]
        total = terms[0]
        for t in terms[1:]:
            total = total + t
        out.append(total)
    return out


def _window_taps(a, tile: int, axis: int):
    """The tile+2 taps of the Winograd windows along one spatial axis of `a`, which holds
    that axis as (blocks, tile) at (axis, axis + 1). Window t covers rows tile*t - 1 ...
    tile*t + tile of the map, so tap i is row (i - 1) % tile of block t + (i - 1) // tile
    (zero beyond the map). Slices of the reshaped map, not strided slices of a padded one:
    XLA:CPU fuses these and their autodiff transposes into fast loops (with strided slices
    the backward took 1.3-1.6x as long; bench/RESULTS.md)."""
    taps = []
    for i in range(tile + 2):
        tap = jax.lax.index_in_dim(a, (i - 1) % tile, axis + 1, keepdims=False)
        shift = (i - 1) // tile  # -1, 0 or +1 block
        if shift:
            pad = [(0, 0)] * tap.ndim
            pad[axis] = (1, 0) if shift < 0 else (0, 1)
            tap = jax.lax.slice_in_dim(jnp.pad(tap, pad), max(shift, 0),
                                       tap.shape[axis] + max(shift, 0), axis=axis)
        taps.append(tap)
    return taps


def _band_taps(a, tile: int, axis: int):
    """The tile+2 taps of the Winograd windows along `axis` of a band of rows that holds
    its tile*R rows and one halo row either side (zero beyond the map): window t covers
    band rows tile*t ... tile*t + tile + 1, so tap i is row i % tile of block t of the
    band from row i - i % tile on (the band padded to whole blocks past its last window).
    Slices of a reshape, like `_window_taps`."""
    blocks = (a.shape[axis] - 2) // tile
    if tile > 2:
        pad = [(0, 0)] * a.ndim
        pad[axis] = (0, tile - 2)
        a = jnp.pad(a, pad)
    taps = []
    for i in range(tile + 2):
        start = i - i % tile
        s = jax.lax.slice_in_dim(a, start, start + blocks * tile, axis=axis)
        s = s.reshape(*a.shape[:axis], blocks, tile, *a.shape[axis + 1:])
        taps.append(jax.lax.index_in_dim(s, i % tile, axis + 1, keepdims=False))
    return taps


def _input_tiles(x, tile: int, columns_first: bool = False):
    """B^T d B for every (tile+2)^2 window of a band x (n, tile*R + 2, w, c): its rows
    with one halo row above and below (`_over_chunks`), stride `tile`, zero beyond the
    map's columns (padded at the end to whole tiles): (tile+2)^2 arrays (n, R, tw, c),
    index p*(tile+2)+q. `columns_first` transforms along the columns first: the same
    tiles from different ops, so that XLA does not merge the backward's recomputation
    with the forward's tiles (which would keep those alive until the backward)."""
    bt = WINOGRAD[tile][0]
    n, h, w, c = x.shape
    tw = -(-w // tile)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, tile * tw - w), (0, 0))).reshape(n, h, tw, tile, c)
    if columns_first:
        cols = _combine(bt, _window_taps(x, tile, 2))  # (n, h, tw, c) each
        d = [_combine(bt, _band_taps(col, tile, 1)) for col in cols]  # d[q][p]
        return [d[q][p] for p in range(tile + 2) for q in range(tile + 2)]
    rows = _combine(bt, _band_taps(x, tile, 1))  # (n, R, tw, tile, c) each
    return [v for r in rows for v in _combine(bt, _window_taps(r, tile, 2))]


def _t(matrix):
    return tuple(zip(*matrix))


def _dtypes(dtype, tile: int):
    """(product dtype, transform dtype): transforms and sums in at least float32, the
    products in the input dtype, except F(4x4)'s: its transforms scale values by up to
    100 and cancel them again, which 16-bit products do not survive (bf16 error ~20x
    XLA's bf16 conv); 'auto' gives 16-bit layers F(2x2) instead."""
    ct = jnp.promote_types(dtype, jnp.float32)
    return (ct if tile > 2 else dtype), ct


def _kernel_tiles(kernel, tile: int, ct):
    """G g G^T: (tile+2)^2 arrays (Cin, Cout), index p*(tile+2)+q."""
    g = WINOGRAD[tile][1]
    return [v for r in _combine(g, list(kernel.astype(ct))) for v in _combine(g, list(r))]


def _tiled(y, tile: int):
    """y (n, h, w, c) zero-padded to whole tiles and split (n, th, tile, tw, tile, c)."""
    n, h, w, c = y.shape
    th, tw = -(-h // tile), -(-w // tile)
    y = jnp.pad(y, ((0, 0), (0, tile * th - h), (0, tile * tw - w), (0, 0)))
    return y.reshape(n, th, tile, tw, tile, c)


def _conv_tiles(x, u, tile: int, mt, ct):
    """The conv of a band x (rows plus a halo row each side) with the kernel whose tiles
    are u: input tiles, one matmul per tile position (tiles x Cin) . (Cin x Cout), output
    transform A^T m A; the band's rows of the output."""
    at = WINOGRAD[tile][2]
    n, _, w, cin = x.shape
    d = _input_tiles(x.astype(ct), tile)
    th, tw = d[0].shape[1:3]
    m = [jnp.dot(dv.reshape(-1, cin).astype(mt), uv.astype(mt),
                 preferred_element_type=ct).reshape(n, th, tw, -1)
         for dv, uv in zip(d, u)]  # (n, th, tw, cout) each, index p * (tile+2) + q
    a = tile + 2
    cols = [_combine(at, m[q::a]) for q in range(a)]  # cols[q][i]: A^T over p
    y = [_combine(at, [cols[q][i] for q in range(a)]) for i in range(tile)]  # y[i][j]
    y = jnp.stack([jnp.stack(yi, axis=3) for yi in y], axis=2)  # (n, th, i, tw, j, cout)
    return y.reshape(n, tile * th, tile * tw, -1)[:, :, :w].astype(x.dtype)


def _kernel_grad_tiles(x, dy, tile: int, mt, ct):
    """The kernel gradient in the Winograd domain, d_pq^T . dm_pq per tile position, from
    the input tiles (recomputed, columns first) and the output transform's transpose of dy."""
    at = WINOGRAD[tile][2]
    cin, cout = x.shape[-1], dy.shape[-1]
    dy = _tiled(dy.astype(ct), tile)
    # transpose of y_ij = sum_pq A^T[i,p] A^T[j,q] m_pq
    rows = _combine(_t(at), [dy[:, :, i] for i in range(tile)])  # over p: (n, th, tw, j, c)
    dm = [v for r in rows for v in _combine(_t(at), [r[:, :, :, j] for j in range(tile)])]
    d = _input_tiles(x.astype(ct), tile, columns_first=True)
    return [jax.lax.dot_general(dv.reshape(-1, cin).astype(mt), mv.reshape(-1, cout).astype(mt),
                                (((0,), (0,)), ((), ())), preferred_element_type=ct)
            for dv, mv in zip(d, dm)]  # (cin, cout) each


# Each conv runs over parts of the batch (chunks of images, and bands of rows where one
# image is too large) whose input map is at most this many bytes (float32, counting the
# larger of Cin and Cout): the transformed tiles and products of a part (4-8x its map for
# F(2x2)) are the conv's temporaries. Layers of up to NARROW_CHANNELS channels take parts
# of NARROW_CHUNK_BYTES, whose tiles and products (~1-2 MB) stay in the cores' L2 cache
# between the transforms and the matmuls: forward + both gradients 20-45% faster than
# with 8 MB parts (32x32 64->64 b128: 299 ms against 430-517; d2l's 16x16 64->64: 85
# against 148; 224x224 64->64 b8, bands of 4 rows: 1124 against 1760; bench/RESULTS.md,
# 2026-11-29). Wider layers keep CHUNK_BYTES: their kernel tiles (1-16 MB) do not fit in
# L2 either way, and each part reads all of them, so small parts lose (56x56 256->256
# b16: 1785 ms with 0.2 MB parts, 1226 with 3.2 MB). At 224x224, batch 16, conv1_2's tiles
# were ~1.6 GB unchunked.
CHUNK_BYTES = 8 << 20
NARROW_CHUNK_BYTES = 256 << 10
NARROW_CHANNELS = 128


def chunk_budget(channels: int) -> int:
    """The bytes of input map a part of a conv with `channels` (the larger of Cin and
    Cout) may hold."""
    return NARROW_CHUNK_BYTES if channels <= NARROW_CHANNELS else CHUNK_BYTES


def batch_chunks(shape, channels: int, devices: int = 1) -> int:
    """How many equal chunks winograd_conv3x3 splits a batch of maps `shape` (n, h, w, c)
    into: the fewest whose whole chunk holds at most `chunk_budget(channels)` bytes
    (`channels` = the larger of Cin and Cout), wherever its images live. With `devices`
    that divide the batch, the chunks also divide every device's share (a data-parallel
    batch keeps each device's images in every chunk, so no chunk moves images between
    devices), and when no such chunk fits, each chunk takes one image per device. The
    budget counts the whole chunk, not a device's part, so an array on one device of a
    many-device host gets chunks of the budget too (a data-parallel batch gets smaller
    ones per device)."""
    n, h, w = shape[:3]
    share = n // devices if n % devices == 0 else n
    per_image = h * w * channels * 4
    return next((k for k in range(1, share + 1)
                 if share % k == 0 and n // k * per_image <= chunk_budget(channels)), share)


def band_rows(shape, channels: int, tile: int, chunks: int) -> int:
    """How many rows of each image a chunk of `shape`'s batch takes per loop step: all of
    them (padded to whole tiles) when the chunk fits the budget, else the largest band
    of whole tile rows that divides the tiled map and fits (at least one tile row): VGG's
    first layers at 224x224 (12.25 MB an image at conv1_2) run in bands of a few rows."""
    n, h, w = shape[:3]
    blocks = -(-h // tile)
    per_row = n // chunks * w * channels * 4
    if h * per_row <= chunk_budget(channels):
        return tile * blocks
    return tile * next((r for r in range(blocks, 0, -1)
                        if blocks % r == 0 and r * tile * per_row <= chunk_budget(channels)), 1)


def _over_chunks(f, carry, xs, halos, tile: int, channels: int, out_channels: int | None,
                 dtype):
    """f(carry, *part) -> (carry, y) over the parts of the arrays xs (n, h, w, *): equal
    chunks of the batch (`batch_chunks`), each in bands of rows (`band_rows`), so that a
    part is at most CHUNK_BYTES at any batch and map size. Array j's part has its band's
    rows plus halos[j] zero-padded rows above and below (the rows its 3x3 windows read);
    f's y is the band's rows, and the y's come back as one (n, h, w, out_channels) array
    (out_channels None: f returns no y, only the carry comes back). Chunk i holds the i-th
    run of consecutive images of every device's share of the batch: with the batch
    sharded over devices (data parallel), each device keeps its own images of every chunk
    and the loop needs no resharding. A fori_loop that writes each y into the output in place: lax.map/scan start their
    outputs from a zero broadcast that XLA shares between same-shaped loops and keeps
    alive from the forward to the backward, copying it into each loop (~0.6 GB in
    VGG-16's step at 224x224, batch 16). This output starts as `0 * xs[0][0,0,0,0]`
    instead, a value no other loop has."""
    n, h, w = xs[0].shape[:3]
    devices = jax.device_count()
    chunks = batch_chunks(xs[0].shape, channels, devices)
    rows = band_rows(xs[0].shape, channels, tile, chunks)
    bands = -(-h // rows)
    span = bands * rows
    groups = devices if n % (devices * chunks) == 0 else 1  # one per device's share
    each = n // (groups * chunks)  # a chunk's images from each group, contiguous

    def padded(a, halo):
        return jnp.pad(a, ((0, 0), (halo, span - h + halo)) + ((0, 0),) * (a.ndim - 2))

    if bands > 1:  # padded once: a pad inside the loop is a copy of the chunk per band
        xs = [padded(a, halo) for a, halo in zip(xs, halos)]

    def part(arrays, i):
        out = []
        for a, halo in zip(arrays, halos):
            if i is not None:  # inside the loop: this step's chunk
                a = jax.lax.dynamic_index_in_dim(a, i // bands, 1, keepdims=False)
                a = a.reshape(groups * each, *a.shape[2:])
            if bands > 1:
                a = jax.lax.dynamic_slice_in_dim(a, i % bands * rows, rows + 2 * halo, axis=1)
            else:
                a = padded(a, halo)
            out.append(a)
        return out

    if chunks * bands == 1:
        carry, y = f(carry, *part(xs, None))
        return carry, (None if y is None else y[:, :h])
    xs = [a.reshape(groups, chunks, each, *a.shape[1:]) for a in xs]
    if out_channels is None:
        return jax.lax.fori_loop(0, chunks * bands, lambda i, c: f(c, *part(xs, i))[0],
                                 carry), None

    def body(i, state):
        carry, out = state
        carry, y = f(carry, *part(xs, i))
        y = y.reshape(groups, 1, each, *y.shape[1:])
        start = (0, i // bands, 0, i % bands * rows, 0, 0)
        return carry, jax.lax.dynamic_update_slice(out, y, start)

    out = jnp.broadcast_to((xs[0][0, 0, 0, 0, 0, 0] * 0).astype(dtype),
                           (groups, chunks, each, span, w, out_channels))
    carry, out = jax.lax.fori_loop(0, chunks * bands, body, (carry, out))
    return carry, out.reshape(n, span, w, out_channels)[:, :h]


def winograd_conv3x3(x, kernel, tile: int = 2):
    """'same' 3x3 conv, stride 1, NHWC x HWIO, by Winograd's F(tile x tile, 3x3)
    (WINOGRAD): input B^T d B on (tile+2)^2 windows with stride `tile`, kernel G g G^T,
    output A^T m A; the (tile+2)^2 products are matmuls (tiles x Cin) . (Cin x Cout).
    Equals lax.conv to float rounding (tests/test_conv_impl.py); runs over parts of the
    batch (`batch_chunks`, `band_rows`), so its transformed tiles stay small temporaries.

    A JAX primitive (`winograd_p`), bilinear in (x, kernel) like lax.conv, so every
    transformation applies: the JVP is two Winograd convs; reverse mode transposes them
    (input gradient: the Winograd conv of dy with the kernel flipped and transposed;
    kernel gradient: `_kernel_grad`, in the Winograd domain from recomputed input tiles),
    keeping only x and the kernel; vmap folds a batched input into the batch and a
    batched kernel into the output channels. Not a custom_vjp (until 2026-11-29): JAX
    refuses its forward mode; not a custom_jvp over the plain code: autodiff would keep
    every layer's tiles for the backward (0.67 GB in VGG-16's step at 32x32 b128)."""
    return winograd_p.bind(x, kernel, tile=tile)


def _winograd(x, kernel, tile):
    mt, ct = _dtypes(x.dtype, tile)
    u = _kernel_tiles(kernel, tile, ct)
    return _over_chunks(lambda _, xc: (None, _conv_tiles(xc, u, tile, mt, ct)), None, [x],
                        [1], tile, max(kernel.shape[2:]), kernel.shape[3], x.dtype)[1]


def _kernel_grad(x, dy, tile, kernel_shape, kernel_dtype):
    """d(sum dy * conv(x, k)) / dk: per part of the batch, d_pq^T . dm_pq in the Winograd
    domain (input tiles recomputed from x), then G's transpose back to 3x3."""
    mt, ct = _dtypes(x.dtype, tile)
    dy = dy.astype(x.dtype)
    # x + 0 * one element of dy: ties the recomputed input tiles to this layer's step of
    # the backward; without a data dependency XLA's scheduler computes them as soon as x
    # exists, several layers' tiles at once (optimization barriers do not survive XLA:CPU's
    # pipeline).
    x = x + (dy[0, 0, 0, 0] * 0).astype(x.dtype)

    def chunk(du, xc, dyc):
        return [a + b for a, b in zip(du, _kernel_grad_tiles(xc, dyc, tile, mt, ct))], None

    zeros = [jnp.zeros(kernel_shape[2:], ct)] * (tile + 2) ** 2
    du = _over_chunks(chunk, zeros, [x, dy], [1, 0], tile, max(kernel_shape[2:]), None,
                      x.dtype)[0]
    # transpose of u_pq = sum_ab G[p,a] G[q,b] k_ab
    g, a = WINOGRAD[tile][1], tile + 2
    dk = [_combine(_t(g), [du[p * a + q] for q in range(a)]) for p in range(a)]  # [p][b]
    dk = [_combine(_t(g), [dk[p][b] for p in range(a)]) for b in range(3)]  # [b][a]
    dk = jnp.stack([jnp.stack([dk[b][i] for b in range(3)]) for i in range(3)])
    return dk.astype(kernel_dtype)


def _winograd_input_grad(dy, x, kernel, *, tile):
    """Transpose in x: the Winograd conv of dy with the kernel flipped and transposed."""
    return winograd_p.bind(dy.astype(x.aval.dtype),
                           jnp.flip(kernel, (0, 1)).swapaxes(2, 3).astype(kernel.dtype),
                           tile=tile)


def _winograd_kernel_grad(dy, x, kernel, *, tile):
    """Transpose in the kernel: the kernel gradient (`_kernel_grad`)."""
    return _kernel_grad(x, dy, tile, kernel.aval.shape, kernel.aval.dtype)


def _winograd_batch(args, dims, *, tile):
    """vmap: a batched input joins the batch, a batched kernel the output channels; both
    batched, one conv per element (lax.map)."""
    (x, k), (bx, bk) = args, dims
    none = None  # batching.not_mapped
    if bk is none:
        x = jnp.moveaxis(x, bx, 0)
        b, n = x.shape[:2]
        y = winograd_p.bind(x.reshape(b * n, *x.shape[2:]), k, tile=tile)
        return y.reshape(b, n, *y.shape[1:]), 0
    k = jnp.moveaxis(k, bk, 0)
    if bx is none:
        b, cout = k.shape[0], k.shape[-1]
        y = winograd_p.bind(x, jnp.moveaxis(k, 0, -2).reshape(*k.shape[1:4], b * cout),
                            tile=tile)
        return jnp.moveaxis(y.reshape(*y.shape[:3], b, cout), 3, 0), 0
    x = jnp.moveaxis(x, bx, 0)
    return jax.lax.map(lambda xk: winograd_p.bind(*xk, tile=tile), (x, k)), 0


winograd_p = Primitive("vgg_jax_winograd_conv3x3")
winograd_p.def_impl(lambda x, kernel, *, tile: _winograd_jit(x, kernel, tile))
winograd_p.def_abstract_eval(
    lambda x, kernel, *, tile: ShapedArray((*x.shape[:3], kernel.shape[3]), x.dtype))
mlir.register_lowering(winograd_p, mlir.lower_fun(
    lambda x, kernel, *, tile: _winograd(x, kernel, tile), multiple_results=False))
ad.defbilinear(winograd_p, _winograd_input_grad, _winograd_kernel_grad)
batching.primitive_batchers[winograd_p] = _winograd_batch
_winograd_jit = jax.jit(_winograd, static_argnums=2)
