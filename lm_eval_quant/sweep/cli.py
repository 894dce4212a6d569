"""``lm-eval-quant sweep [SPEC.yaml] [flags]``: run or resume a sweep (see docs/sweep.md).

Flags give the same fields as the YAML spec; given both, a flag overrides the YAML field.
Exit status: 0 when every runnable cell is finished, 1 when some cell failed, 2 on a bad spec
(one line: ``lm-eval-quant: error: ...``), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import sys

from lm_eval_quant.errors import QuantArgError

PROG = "lm-eval-quant sweep"


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _typed(v: str):
    import yaml

    try:
        return yaml.safe_load(v)
    except yaml.YAMLError:
        return v


def _kv(s: str, what: str) -> dict:
    from lm_eval_quant.args import split_model_args

    return {k: _typed(v) for k, v in split_model_args(s, where=f"sweep: {what}").items()}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every lm-eval-quant error
        raise QuantArgError(f"sweep: {message} (see {PROG} -h)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Run a models x methods x bits x group sizes x formats sweep, one lm-eval "
                "run per cell (resumable; rerun the same command to continue).")
    p.add_argument("spec", nargs="?", help="YAML sweep spec (optional when --models and --tasks are given)")
    p.add_argument("--out", "-o", help="output folder (default: lmq_out/<spec name>)")
    p.add_argument("--launcher", choices=["local", "ray"], default="local",
                   help="local: cells one after another here; ray: one Ray task per cell")
    p.add_argument("--ray-address", "--ray_address", default=None, help="ray.init(address=...); default: a local Ray")
    g = p.add_argument_group("spec fields (override the YAML)")
    g.add_argument("--name")
    g.add_argument("--models", help="comma-separated model folders or hub ids")
    g.add_argument("--methods", help="comma-separated: none,rtn,gptq,awq,bnb")
    g.add_argument("--bits", help="comma-separated, e.g. 16,8,4,3")
    g.add_argument("--group-sizes", "--group_sizes", dest="group_sizes", help="comma-separated, -1 = per row")
    g.add_argument("--formats", help="comma-separated: int,fp,fp:e2m1,nf,dynamic (bnb: nf4,fp4)")
    g.add_argument("--sym", help="comma-separated true/false")
    g.add_argument("--tasks", help="comma-separated lm-eval task names")
    g.add_argument("--model-args", "--model_args", dest="model_args",
                   help="k=v,... added to every cell's model_args (e.g. dtype=float32)")
    g.add_argument("--method-args", "--method_args", dest="method_args",
                   help="[method:]k=v,... method options (e.g. gptq:damp=0.02); no prefix = all methods")
    g.add_argument("--lm-eval-model", dest="lm_eval_model", help=argparse.SUPPRESS)
    h = p.add_argument_group("harness options (override the YAML)")
    h.add_argument("--limit", type=float)
    h.add_argument("--batch-size", "--batch_size", dest="batch_size")
    h.add_argument("--max-batch-size", "--max_batch_size", dest="max_batch_size", type=int)
    h.add_argument("--num-fewshot", "--num_fewshot", dest="num_fewshot", type=int)
    h.add_argument("--apply-chat-template", "--apply_chat_template", dest="apply_chat_template",
                   nargs="?", const=True, default=None)
    h.add_argument("--fewshot-as-multiturn", "--fewshot_as_multiturn", dest="fewshot_as_multiturn",
                   action="store_true", default=None)
    h.add_argument("--system-instruction", "--system_instruction", dest="system_instruction")
    h.add_argument("--device")
    h.add_argument("--include-path", "--include_path", dest="include_path", action="append",
                   help="task folder (repeatable, or ':'-separated)")
    h.add_argument("--include-defaults", "--include_defaults", dest="include_defaults",
                   choices=["auto", "true", "false"], help="index lm-eval's built-in tasks (auto: only if needed)")
    h.add_argument("--gen-kwargs", "--gen_kwargs", dest="gen_kwargs")
    h.add_argument("--log-samples", "--log_samples", dest="log_samples", action="store_true", default=None,
                   help="keep per-sample logs (the default; the report's flips/KL/significance need them)")
    h.add_argument("--no-log-samples", "--no_log_samples", dest="log_samples", action="store_false",
                   help="do not write samples_<task>_<ts>.jsonl (the report's beyond-accuracy columns stay empty)")
    h.add_argument("--no-token-kl", "--no_token_kl", dest="token_kl", action="store_false", default=None,
                   help="do not store the fp top-32 reference / token-level KL on perplexity tasks")
    h.add_argument("--seed", type=int)
    h.add_argument("--metadata", help="JSON object of task metadata (like lm_eval --metadata)")
    h.add_argument("--cell-timeout", "--cell_timeout", dest="cell_timeout", type=float,
                   help="seconds; a cell running longer is killed and recorded as failed")
    r = p.add_argument_group("run control")
    r.add_argument("--dry-run", action="store_true", help="list the cells (and what a rerun would skip) and exit")
    r.add_argument("--no-retry-failed", dest="retry_failed", action="store_false",
                   help="leave cells that failed in an earlier run alone")
    r.add_argument("--no-progress", dest="progress", action="store_false")
    r.add_argument("--start", choices=["auto", "fork", "spawn"], default="auto",
                   help="local launcher: fork cells from a pre-imported server (fast; auto on Linux) or spawn "
                        "each as a new interpreter")
    return p


def spec_from_args(a) -> "object":
    import yaml

    from lm_eval_quant.sweep.spec import SweepSpec

    d: dict = {}
    if a.spec:
        from pathlib import Path

        sp = Path(a.spec)
        if not sp.is_file():
            raise QuantArgError(f"sweep: spec file not found: {sp}")
        try:
            d = yaml.safe_load(sp.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise QuantArgError(f"sweep: {sp} is not UTF-8 text (invalid byte at offset {e.start}); save the spec as UTF-8") from None
        except yaml.YAMLError as e:
            raise QuantArgError(f"sweep: {sp} is not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(d, dict):
            raise QuantArgError(f"sweep: {sp} must hold a mapping (models:, tasks:, ...)")
        d = dict(d)
    harness = dict(d.pop("harness", None) or {})
    for k in ("name", "lm_eval_model"):
        if getattr(a, k):
            d[k] = getattr(a, k)
    if a.models:
        d["models"] = _csv(a.models)
    if a.methods:
        d["methods"] = _csv(a.methods)
    for k in ("bits", "group_sizes", "formats", "sym", "tasks"):
        if getattr(a, k):
            d.pop(k.rstrip("s"), None)
            d[k] = _csv(getattr(a, k))
    if a.model_args:
        ma = d.get("model_args") or {}
        if isinstance(ma, str):
            ma = _kv(ma, "model_args")
        ma.update(_kv(a.model_args, "--model-args"))
        d["model_args"] = ma
    if a.method_args:
        _apply_method_args(d, a.method_args)
    for k in ("limit", "batch_size", "max_batch_size", "num_fewshot", "apply_chat_template", "fewshot_as_multiturn",
              "system_instruction", "device", "gen_kwargs", "log_samples", "token_kl", "seed", "cell_timeout",
              "include_defaults"):
        v = getattr(a, k)
        if v is None:
            continue
        d.pop(k, None)
        if k == "limit" and float(v).is_integer() and v >= 1:
            v = int(v)
        if k in ("batch_size", "apply_chat_template", "include_defaults") and isinstance(v, str):
            v = _typed(v)
        harness[k] = v
    if a.metadata:
        import json

        try:
            md = json.loads(a.metadata)
        except json.JSONDecodeError as e:
            raise QuantArgError(f"sweep: --metadata must be a JSON object ({e.msg})") from None
        if not isinstance(md, dict):
            raise QuantArgError("sweep: --metadata must be a JSON object, e.g. '{\"max_seq_lengths\": [4096]}'")
        harness["metadata"] = md
        d.pop("metadata", None)
    if a.include_path:
        paths = [x for s in a.include_path for x in s.split(":") if x]
        harness["include_path"] = paths
        d.pop("include_path", None)
    if not d.get("models") or not d.get("tasks"):
        missing = [k for k in ("models", "tasks") if not d.get(k)]
        raise QuantArgError(f"sweep: no {' and no '.join(missing)} given; pass a YAML spec or --models/--tasks")
    d["harness"] = harness
    return SweepSpec.from_dict(d)


def _apply_method_args(d: dict, s: str) -> None:
    methods = d.get("methods") or ["rtn"]
    if isinstance(methods, str):
        methods = _csv(methods)
    methods = [dict(m) if isinstance(m, dict) else {"name": str(m)} for m in methods]
    for part in _csv(s):
        head, eq, v = part.partition("=")
        if not eq:
            raise QuantArgError(f"sweep: --method-args must be [method:]key=value, got {part!r}")
        meth, colon, key = head.partition(":")
        if not colon:
            meth, key = "", head
        targets = [m for m in methods if not meth or m["name"] == meth.strip().lower()]
        if not targets:
            raise QuantArgError(f"sweep: --method-args names method {meth!r}, which is not in the sweep's methods")
        for m in targets:
            m.setdefault("options", {})
            m["options"] = dict(m["options"] or {}, **{key.strip(): _typed(v.strip())})
    d["methods"] = methods


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        a = build_parser().parse_args(argv)
        spec = spec_from_args(a)
        from pathlib import Path

        from lm_eval_quant.sweep.runner import run_sweep

        from lm_eval_quant.sweep.spec import _slug

        out = a.out or str(Path("lmq_out") / _slug(spec.name))
        res = run_sweep(spec, out, launcher=a.launcher, ray_address=a.ray_address, progress=a.progress,
                        retry_failed=a.retry_failed, dry_run=a.dry_run, start=a.start)
    except QuantArgError as e:
        print(f"lm-eval-quant: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # no space / read-only while writing logs or status: nothing half-committed
        from lm_eval_quant.sweep._io import os_error_line

        print(f"lm-eval-quant: error: {os_error_line(e, 'sweep')}; finished cells are kept, rerun to resume",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lm-eval-quant sweep: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    print(res.table())
    n = {s: sum(c.status == s for c in res.cells) for s in ("done", "skipped_done", "failed", "skipped", "planned")}
    print(f"{len(res.cells)} cells: {n['done']} done, {n['skipped_done']} already done, {n['failed']} failed, "
          f"{n['skipped']} skipped (invalid)" + (f", {n['planned']} to run" if a.dry_run else "")
          + f"; results in {res.out_dir}")
    return 1 if n["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
