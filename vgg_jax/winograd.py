"""Winograd's minimal filtering F(m x m, 3x3) (Lavin & Gray 2016) for VGG's 3x3 convs on
CPU: the transforms, the batch chunking, and `winograd_conv3x3`, a bilinear JAX primitive
(so jvp, grad, vmap and their compositions all apply). `vgg_jax.conv` decides per layer
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


def _input_tiles(x, tile: int, columns_first: bool = False):
    """B^T d B for every (tile+2)^2 window of x (stride `tile`, zero beyond the map, x
    padded at the end to whole tiles): (tile+2)^2 arrays (n, th, tw, c), index p*(tile+2)+q.
    `columns_first` transforms along the columns first: the same tiles from different
    ops, so that XLA does not merge the backward's recomputation with the forward's
    tiles (which would keep those alive until the backward)."""
    bt = WINOGRAD[tile][0]
    x = _tiled(x, tile)
    if columns_first:
        cols = _combine(bt, _window_taps(x, tile, 3))  # (n, th, tile, tw, c) each
        d = [_combine(bt, _window_taps(col, tile, 1)) for col in cols]  # d[q][p]
        return [d[q][p] for p in range(tile + 2) for q in range(tile + 2)]
    rows = _combine(bt, _window_taps(x, tile, 1))  # (n, th, tw, tile, c) each
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
    """The conv of x with the kernel whose tiles are u: input tiles, one matmul per tile
    position (tiles x Cin) . (Cin x Cout), output transform A^T m A."""
    at = WINOGRAD[tile][2]
    n, h, w, cin = x.shape
    d = _input_tiles(x.astype(ct), tile)
    th, tw = d[0].shape[1:3]
    m = [jnp.dot(dv.reshape(-1, cin).astype(mt), uv.astype(mt),
                 preferred_element_type=ct).reshape(n, th, tw, -1)
         for dv, uv in zip(d, u)]  # (n, th, tw, cout) each, index p * (tile+2) + q
    a = tile + 2
    cols = [_combine(at, m[q::a]) for q in range(a)]  # cols[q][i]: A^T over p
    y = [_combine(at, [cols[q][i] for q in range(a)]) for i in range(tile)]  # y[i][j]
    return _untile([v for yi in y for v in yi], tile)[:, :h, :w].astype(x.dtype)


def _untile(y, tile: int):
    """The output map (n, tile*th, tile*tw, c) from its tile*tile output tiles y[i*tile+j]
    (n, th, tw, c) each. F(2x2)'s four are stacked next to the channels (one loop that
    picks among them per element). For F(4x4)'s sixteen that loop ran 3-4x slower than
    stacking them on a new leading axis and transposing (a stack of whole arrays, then a
    copy of channel rows): a 56x56x256 layer's forward + both gradients at batch 16 took
    986 ms before, 500 after (bench/RESULTS.md, 2026-11-30)."""
    n, th, tw, c = y[0].shape
    if tile == 2:
        y = jnp.stack([jnp.stack(y[i * tile:(i + 1) * tile], axis=3) for i in range(tile)],
                      axis=2)  # (n, th, i, tw, j, c)
    else:
        y = jnp.stack(y).reshape(tile, tile, n, th, tw, c).transpose(2, 3, 0, 4, 1, 5)
    return y.reshape(n, tile * th, tile * tw, c)


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


# Each conv runs over chunks of the batch whose input map is at most this many bytes
# (float32): the transformed tiles of a chunk (2.25-4x its map, per tile set) are the
# conv's temporaries, so they stay a few tens of MB at any batch and image size (at
# 224x224, batch 16, conv1_2's tiles were ~1.6 GB unchunked). VGG-16's training step at
# 32x32 b128 took 0.90 s with 4 MB chunks, 0.78 with 8 MB, 0.81 with 32 MB, 0.80 unchunked
# (measured with lax.map over the chunks, before the fori_loop below).
CHUNK_BYTES = 8 << 20


def batch_chunks(shape, channels: int, devices: int = 1) -> int:
    """How many equal chunks winograd_conv3x3 splits a batch of maps `shape` (n, h, w, c)
    into: the fewest whose whole chunk holds at most CHUNK_BYTES (`channels` = the larger
    of Cin and Cout), wherever its images live. With `devices` that divide the batch, the
    chunks also divide every device's share (a data-parallel batch keeps each device's
    images in every chunk, so no chunk moves images between devices), and when no such
    chunk fits, each chunk takes one image per device. The budget counts the whole chunk,
    not a device's part, so an array on one device of a many-device host gets chunks of
    CHUNK_BYTES too (a data-parallel batch gets smaller ones per device)."""
    n, h, w = shape[:3]
    share = n // devices if n % devices == 0 else n
    per_image = h * w * channels * 4
    return next((k for k in range(1, share + 1)
                 if share % k == 0 and n // k * per_image <= CHUNK_BYTES), share)


def _over_chunks(f, carry, xs, chunks: int, out_channels: int | None, dtype):
    """f(carry, *chunk) -> (carry, y) over `chunks` equal parts of the batch of the arrays
    xs, returning the carry and the y's as one batch (out_channels None: f returns no y,
    only the carry comes back). Chunk i holds images i, i + chunks,
    i + 2 chunks, ...: with the batch sharded over devices (data parallel), each device
    keeps its own images of every chunk and the loop needs no resharding. A fori_loop that
    writes each y into the output in place: lax.map/scan start their outputs from a zero
    broadcast that XLA shares between same-shaped loops and keeps alive from the forward to
    the backward, copying it into each loop (~0.6 GB in VGG-16's step at 224x224, batch
    16). This output starts as `0 * xs[0][0,0,0,0]` instead, a value no other loop has."""
    if chunks == 1:
        return f(carry, *xs)
    n, h, w = xs[0].shape[:3]
    xs = [a.reshape(n // chunks, chunks, *a.shape[1:]) for a in xs]
    chunk = lambda i: (jax.lax.dynamic_index_in_dim(a, i, 1, keepdims=False) for a in xs)
    if out_channels is None:
        return jax.lax.fori_loop(0, chunks, lambda i, c: f(c, *chunk(i))[0], carry), None

    def body(i, state):
        carry, out = state
        carry, y = f(carry, *chunk(i))
        return carry, jax.lax.dynamic_update_index_in_dim(out, y, i, 1)

    out = jnp.broadcast_to((xs[0][0, 0, 0, 0, 0] * 0).astype(dtype),
                           (n // chunks, chunks, h, w, out_channels))
    carry, out = jax.lax.fori_loop(0, chunks, body, (carry, out))
    return carry, out.reshape(n, h, w, out_channels)


def winograd_conv3x3(x, kernel, tile: int = 2):
    """'same' 3x3 conv, stride 1, NHWC x HWIO, by Winograd's F(tile x tile, 3x3)
    (WINOGRAD): input B^T d B on (tile+2)^2 windows with stride `tile`, kernel G g G^T,
    output A^T m A; the (tile+2)^2 products are matmuls (tiles x Cin) . (Cin x Cout).
    Equals lax.conv to float rounding (tests/test_conv_impl.py); runs over chunks of the
    batch (`batch_chunks`), so its transformed tiles stay small temporaries.

    A JAX primitive (`winograd_p`), bilinear in (x, kernel) like lax.conv, so every
    transformation applies: the JVP is two Winograd convs; reverse mode transposes them
    (input gradient: the Winograd conv of dy with the kernel flipped and transposed;
    kernel gradient: `_kernel_grad`, in the Winograd domain from recomputed input tiles),
    keeping only x and the kernel; vmap folds a batched input into the batch and a
    batched kernel into the output channels. Not a custom_vjp (until 2026-11-29): JAX
    refuses its forward mode; not a custom_jvp over the plain code: autodiff would keep
    every layer's tiles for the backward (0.67 GB in VGG-16's step at 32x32 b128)."""
    return winograd_p.bind(x, kernel, tile=tile)


def _chunks(x_shape, kernel_shape) -> int:
    return batch_chunks(x_shape, max(kernel_shape[2:]), jax.device_count())


def _winograd(x, kernel, tile):
    mt, ct = _dtypes(x.dtype, tile)
    u = _kernel_tiles(kernel, tile, ct)
    return _over_chunks(lambda _, xc: (None, _conv_tiles(xc, u, tile, mt, ct)), None, [x],
                        _chunks(x.shape, kernel.shape), kernel.shape[3], x.dtype)[1]


def _kernel_grad(x, dy, tile, kernel_shape, kernel_dtype):
    """d(sum dy * conv(x, k)) / dk: per chunk of the batch, d_pq^T . dm_pq in the Winograd
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
    du = _over_chunks(chunk, zeros, [x, dy], _chunks(x.shape, kernel_shape), None, x.dtype)[0]
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
