"""`vgg-jax convert`: a torch state_dict, a Keras file or an ONNX graph into a weights
directory (vgg_jax.store), or any weights reference back into a torch state_dict. The
conversions themselves are in convert.py and importers.py; this is the command."""
from __future__ import annotations

from vgg_jax import importers, models, store, weights
from vgg_jax.convert import (from_torch, infer_model_kwargs, load_state_dict, to_torch,
                             torch_layout, weights_meta)
from vgg_jax.errors import MissingDependency, UserError


def _write(out: str, variables, kw: dict, preprocessing: str, source: str) -> None:
    store.save_weights(out, variables, weights_meta(kw, preprocessing))
    head = (f"{kw['num_classes']} classes" if kw.get("include_top", True) else
            "convolutions only, no head")
    print(f"wrote {kw['arch']} from {source} ({head}, "
          f"{models.count_params(variables['params']):,} params) to {out}")


def main(*, arch: str | None = None, torch_file: str | None = None, out: str | None = None,
         keras_file: str | None = None, onnx_file: str | None = None, no_top: bool = False,
         from_dir: str | None = None, torch_out: str | None = None,
         preprocessing: str | None = None) -> None:
    """`vgg-jax convert`: a torch state_dict, a Keras file or an ONNX graph into a weights
    directory; or a weights directory (or workdir, or published name) back into a torch
    state_dict."""
    sources = [s for s in (torch_file, keras_file, onnx_file) if s]
    if len(sources) > 1:
        raise UserError("give one of --from-torch, --from-keras, --from-onnx")
    if sources and out:
        if not arch:
            flag = ("--from-torch" if torch_file else "--from-keras" if keras_file else
                    "--from-onnx")
            raise UserError(f"{flag} needs --arch (e.g. vgg16, vgg16_bn)")
        if keras_file:
            variables, kw = importers.from_keras(keras_file, arch, include_top=not no_top)
            _write(out, variables, kw, preprocessing or "caffe", keras_file)
        elif onnx_file:
            variables, kw = importers.from_onnx(onnx_file, arch, include_top=not no_top)
            _write(out, variables, kw, preprocessing or "torchvision", onnx_file)
        else:
            sd = load_state_dict(torch_file)
            if no_top:
                sd = {k: v for k, v in sd.items() if k.startswith("features.")}
            kw = infer_model_kwargs(sd, arch, include_top=not no_top)
            _write(out, from_torch(sd, arch, include_top=not no_top), kw,
                   preprocessing or "torchvision", torch_file)
    elif from_dir and torch_out:
        variables, meta = weights.load_weights(from_dir)
        saved = meta["model"]["arch"]  # the weights directory knows its architecture
        arch = arch or saved
        if models.canonical_name(arch) != models.canonical_name(saved):
            lost = sorted(set(variables["params"]) - set(torch_layout(arch)))
            raise UserError(
                f"--arch {arch} does not match the weights' architecture {saved} "
                f"({from_dir}/meta.json)" + (f"; {', '.join(lost)} would be lost"
                                             if lost else "") + "; leave out --arch")
        sd = to_torch(variables, arch, as_numpy=torch_out.endswith(".safetensors"),
                      pool=meta["model"].get("classifier_pool", 7))
        if torch_out.endswith(".safetensors"):
            from safetensors.numpy import save_file
            save_file(dict(sd), torch_out)
        else:
            try:
                import torch
            except ImportError:
                raise MissingDependency(f"writing {torch_out} needs torch (pip install "
                                        f"'vgg_jax[torch]'); or write a .safetensors file, "
                                        f"which does not") from None
            torch.save(sd, torch_out)
        print(f"wrote {len(sd)} tensors to {torch_out}")
    else:
        raise UserError("give --from-torch / --from-keras / --from-onnx FILE --out DIR, or "
                        "--from DIR --to-torch FILE")
