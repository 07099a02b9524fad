"""`moescope inspect MODEL`: which MoE layers, router modules, experts, top-k and scoring a model has."""

from __future__ import annotations

import json

from moescope.cli._common import add_command

EXAMPLES = """  moescope inspect moescope:tiny-moe
  moescope inspect ./my-mixtral --json
  moescope inspect ./custom --router-pattern 'blocks.*.moe.router' --top-k 2
"""


def add_parser(sub) -> None:
    p = add_command(sub, "inspect", help="describe a model's MoE layers and how moescope captures them", examples=EXAMPLES)
    p.add_argument("model", help="Hugging Face id, local folder or moescope:NAME")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model folder's own Python code")
    add_custom_router_args(p)
    p.set_defaults(run=run)


def add_custom_router_args(p) -> None:
    g = p.add_argument_group("custom routers (models moescope does not recognise)")
    g.add_argument("--router-pattern", help="fnmatch pattern of router module paths, e.g. 'blocks.*.moe.router'")
    g.add_argument("--router-output", choices=("logits", "probs"), default="logits", help="what the router returns")
    g.add_argument("--router-output-index", type=int, default=None, help="element of the router's return tuple")
    g.add_argument("--top-k", type=int, default=None, help="experts per token (needed with --router-pattern)")
    g.add_argument("--no-renormalize", action="store_true", help="the model does not renormalise top-k weights")


def custom_router_from_args(args):
    from moescope.api import CustomRouter, RouterOutput
    from moescope.errors import MoescopeError

    if not args.router_pattern:
        return None
    if not args.top_k:
        raise MoescopeError("--router-pattern needs --top-k")
    return CustomRouter(pattern=args.router_pattern, top_k=args.top_k, output=RouterOutput(args.router_output),
                        output_index=args.router_output_index, renormalize=not args.no_renormalize)


def run(args) -> int:
    from moescope.api import inspect

    info = inspect(args.model, router=custom_router_from_args(args), trust_remote_code=args.trust_remote_code)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"model: {args.model}  ({info['class']}, model_type={info['model_type']})")
    print(f"family: {info['family_status']}")
    if info.get("unsupported_reason"):
        print(f"  cannot be captured faithfully: {info['unsupported_reason']}")
    print(f"MoE layers: {len(info['layers'])} of {info['num_decoder_layers']} decoder layers;"
          f" dense decoder layers: {info['dense_decoder_layers'] or 'none'}")
    print(f"{'moe':>4} {'decoder':>7}  {'experts':>7} {'top-k':>5} {'shared':>6}  {'scoring':<13} module")
    for layer in info["layers"]:
        print(f"{layer['moe_layer']:>4} {layer['decoder_layer']:>7}  {layer['n_experts']:>7} {layer['top_k']:>5} "
              f"{layer['n_shared_experts']:>6}  {layer['scoring']:<13} {layer['module']}")
    non_compute = next((layer["non_compute_experts"] for layer in info["layers"] if layer["non_compute_experts"]), None)
    if non_compute:
        print(f"non-compute router choices (no expert, no load): ids {non_compute['ids']} ({non_compute['kind']})")
    return 0
