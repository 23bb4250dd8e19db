"""``ebcompile export``: write a (compact) model as ONNX and check it in onnxruntime."""

from __future__ import annotations

import argparse

from .args import add_factory_argument


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export an ebcompile.save directory or Hugging Face model to verified ONNX",
                       description=__doc__)
    p.add_argument("model", help="an ebcompile.save directory (an image run's model/ too), a save_pretrained folder or a "
                                 "hub name")
    p.add_argument("out", help="the .onnx file to write (nothing is left there on failure)")
    p.add_argument("--fp16", action="store_true", help="half-precision weights and activations")
    p.add_argument("--optimize", action="store_true",
                   help="fused attention (one onnxruntime node per layer) + onnxruntime's transformer optimizer")
    p.add_argument("--fused-attention", action="store_true",
                   help="each attention as one onnxruntime contrib node (Attention / MultiHeadAttention / GroupQueryAttention)")
    p.add_argument("--batch", type=int, default=1, help="example batch size used to trace and verify (axis stays dynamic)")
    p.add_argument("--seq", type=int, default=16, help="example sequence length for text models (axis stays dynamic)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison (the checker still runs)")
    p.add_argument("--external-data", action=argparse.BooleanOptionalAction, default=None,
                   help="weights in one data file beside the .onnx (OUT.data); default: when they pass 2 GB")
    add_factory_argument(p)
    p.set_defaults(run=run, check=check)


def check(args: argparse.Namespace) -> None:
    """``--opset`` is one torch.onnx writes, before the model is loaded."""
    from ..export.exporters import check_opset

    check_opset(args.opset)


def run(args: argparse.Namespace) -> int:
    from ..export.onnx import export_onnx
    from .models import load_with_inputs

    model, inputs = load_with_inputs(args.model, args.batch, args.seq, args.factory)
    rep = export_onnx(model, args.out, inputs, dtype="fp16" if args.fp16 else "fp32", opset=args.opset,
                      optimize=args.optimize, verify=not args.no_verify,
                      fused_attention=args.fused_attention or None,  # None: follows --optimize
                      external_data=args.external_data)
    checked = ("not compared with onnxruntime" if rep.max_abs_error is None else
               f"onnxruntime ({', '.join(rep.providers)}) matches PyTorch: max |diff| {rep.max_abs_error:.2e}")
    where = f" (weights in {rep.files[1]})" if rep.external_data else ""
    print(f"{rep.path}: {rep.bytes / 2**20:.1f} MiB{where}, {sum(rep.op_counts.values())} nodes; {checked}")
    for note in rep.notes:
        print(f"  note: {note}")
    return 0
