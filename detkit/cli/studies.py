"""``detkit transfer`` and ``detkit design-space``: studies over many runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from detkit.cli.args import budget_range, int_list, nonnegative_int, positive_int
from detkit.errors import DetkitError

STUDY_OVERRIDES = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def _transfer(args: argparse.Namespace) -> int:
    from detkit.analysis.transfer import format_report, run_transfer, split_list

    out = Path(args.out or Path("runs") / "transfer" / Path(args.config).stem)
    rows = run_transfer(args.config, split_list(args.backbones), pretrained=split_list(args.pretrained),
                        seeds=args.seeds, out=out, overrides=STUDY_OVERRIDES + list(args.overrides),
                        retry_failed=args.retry_failed, latency=not args.no_latency, remeasure=args.remeasure)
    print(format_report(rows, out))
    return 0


def _design_space(args: argparse.Namespace) -> int:
    from detkit.analysis.design_space import Budget, fit_quantized_linear
    from detkit.analysis.design_study import format_summary, parse_widths, run_design_space, write_report

    if args.fit:
        widths = parse_widths(args.fit)
        e_fit, best = fit_quantized_linear(widths)
        print(f"e_fit = {e_fit:.5f} for {len(widths)} blocks (best quantized linear fit: w0 = {best['w0']:g}, "
              f"wa = {best['wa']:.2f}, wm = {best['wm']:.3f})")
        return 0
    if args.report:
        out = Path(args.report)
        print(format_summary(write_report(out), out))
        return 0
    if args.confirm is not None:
        from detkit.analysis.design_study import confirm_design_space

        if not args.space or not args.out:
            raise DetkitError("design-space --confirm K: give SPACE[,SPACE...] and the study's --out DIR")
        spaces = [s.strip() for s in args.space.split(",") if s.strip()]
        summary = confirm_design_space(args.out, spaces, args.confirm, list(args.overrides),
                                       retry_failed=args.retry_failed)
        for name in ("all", *spaces):
            if name in summary:
                r = summary[name]
                print(f"confirm {name}: Spearman rho = {r['spearman']:.3f} (p = {r['p_value']:.3g}, n = {r['n']}) "
                      f"between the study's errors and those with {' '.join(args.overrides)}")
        print(f"pairs: {Path(args.out) / 'confirm.md'}")
        return 0
    if not args.space or not args.task:
        raise DetkitError("design-space: give SPACE[,SPACE...] and --task CONFIG (or --fit WIDTHS, --report DIR)")
    budget = Budget(flops=args.flops_budget, params=args.params_budget, activations=args.activations_budget,
                    paper_constraints=args.paper_constraints, input_size=args.budget_size)
    out = Path(args.out or Path("runs") / "design-space" / Path(args.task).stem)
    rows = run_design_space([s.strip() for s in args.space.split(",") if s.strip()], args.n, args.task, out=out,
                            overrides=STUDY_OVERRIDES + list(args.overrides), budget=budget, seed=args.seed,
                            retry_failed=args.retry_failed)
    print(format_summary(rows, out))
    return 0


def add_parsers(sub) -> None:
    tf = sub.add_parser("transfer", help="train one task config per backbone (and pretrained setting, seed) and "
                                         "report metric, complexity, training time and latency")
    tf.add_argument("config", metavar="CONFIG", help="the task: any detector or segmenter config")
    tf.add_argument("overrides", nargs="*", help="key=value overrides applied to every run (e.g. train.epochs=5)")
    tf.add_argument("--backbones", required=True, metavar="A,B,...",
                    help="registry names, tv:<model>, timm:<model>, efficientnet@phi=P (resolution scaled by "
                         "gamma^phi), or lineage (AlexNet to ConvNeXt, with years and design ideas)")
    tf.add_argument("--pretrained", default=None, metavar="W,...",
                    help="settings per backbone: none (from scratch), a weights name/file for all, or "
                         "BACKBONE=WEIGHTS for one (default: all from scratch)")
    tf.add_argument("--seeds", type=int_list, default=[0], metavar="S,...", help="one run per seed (default 0)")
    tf.add_argument("--out", default=None, help="study folder (default runs/transfer/<config name>); run the "
                                                 "same command again to resume")
    tf.add_argument("--retry-failed", action="store_true", help="run failed trials again (default: skip them)")
    tf.add_argument("--no-latency", action="store_true", help="do not time inference")
    tf.add_argument("--remeasure", action="store_true",
                    help="measure finished runs again (complexity, latency), e.g. on a quiet machine; no training")
    tf.set_defaults(func=_transfer)

    ds = sub.add_parser("design-space", help="sample backbones from design spaces (RegNet, AnyNet), train each on a "
                                             "task, and compare the spaces by their error EDFs")
    ds.add_argument("space", nargs="?", metavar="SPACE[,SPACE...]",
                    help="anynetx_a ... anynetx_e, regnetx_full, regnetx (refined), regnety, csp (CPU-efficient)")
    ds.add_argument("overrides", nargs="*", help="key=value overrides applied to the task")
    ds.add_argument("--task", metavar="CONFIG", help="the task config every sample trains on")
    ds.add_argument("--n", type=positive_int, default=16, help="samples per space (default 16; more extends a study)")
    ds.add_argument("--flops-budget", type=budget_range, default=(None, None), metavar="[MIN:]MAX",
                    help="classifier FLOPs (multiply-adds) at --budget-size, e.g. 400M or 360M:400M")
    ds.add_argument("--budget-size", type=positive_int, default=224, metavar="PX",
                    help="input side the budgets count at (default 224, ImageNet's; e.g. 320, a detection size)")
    ds.add_argument("--params-budget", type=budget_range, default=(None, None), metavar="[MIN:]MAX",
                    help="parameters, e.g. 6M")
    ds.add_argument("--activations-budget", type=budget_range, default=(None, None), metavar="[MIN:]MAX",
                    help="activations (conv outputs) at --budget-size, e.g. 5M")
    ds.add_argument("--paper-constraints", action="store_true",
                    help="also activations <= 6.5 sqrt(GF) M and params <= 3.0 + 5.5 GF M (the refined RegNetX)")
    ds.add_argument("--seed", type=nonnegative_int, default=0, help="sampling seed (default 0)")
    ds.add_argument("--out", default=None, help="study folder (default runs/design-space/<task name>); run the "
                                                 "same command again to resume, another SPACE to add one")
    ds.add_argument("--retry-failed", action="store_true", help="run failed samples again (default: skip them)")
    ds.add_argument("--fit", default=None, metavar="WIDTHS",
                    help="only print e_fit of a network's block widths: a RegNet preset, 1x32,2x64,... or 32,64,...")
    ds.add_argument("--report", default=None, metavar="DIR", help="only rewrite the report of the study in DIR")
    ds.add_argument("--confirm", type=positive_int, default=None, metavar="K",
                    help="train K samples of the study in --out again with the overrides given (e.g. "
                         "train.budget=10min): the 3 best and the rest spread over the ranks; report the Spearman "
                         "rank correlation between the two errors")
    ds.set_defaults(func=_design_space)
