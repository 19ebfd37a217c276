"""The ``esper`` command line.

    esper train ppo|heuristic|random|static|shipped [--task T] [--slots ID ...] [--envs K] ...
    esper eval CHECKPOINT|shipped [--task T] [--slots ID ...] [--episodes N]
    esper build-policy --out FILE.pt [--seed N] [--teacher heuristic|always-grow] [--quick]
    esper report RUN_DIR
    esper tasks

Bad input (unknown task, slot, config key, missing data or checkpoint, ...) exits with
status 2 and one line on stderr, never a traceback (set ESPER_DEBUG=1 to see one).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from esper import __version__
from esper.telemetry.console import Console

CONTROLLERS = ("ppo", "heuristic", "random", "static", "shipped")


class UsageError(ValueError):
    """Bad command-line input: printed as one line, exit status 2."""


def _defaults():
    from esper.run_config import RunSection

    return RunSection()


def _add_env_flags(p: argparse.ArgumentParser) -> None:
    d = _defaults()
    p.add_argument("--task", help=f"task name, see `esper tasks` (default: {d.task})")
    p.add_argument(
        "--slots", nargs="+", metavar="ID",
        help="enabled slot ids, e.g. r0c0 r0c1 (default: the task's slots)",
    )  # fmt: skip
    p.add_argument("--envs", type=int, help=f"envs stepped in lockstep (default: {d.envs})")
    p.add_argument(
        "--max-epochs", type=int, help="steps (host epochs) per episode (default: the task's)"
    )
    p.add_argument("--seed", type=int, help=f"run seed (default: {d.seed})")
    p.add_argument("--device", help=f"cpu, cuda or cuda:N (default: {d.device})")
    p.add_argument(
        "--env-devices", nargs="+", metavar="DEV",
        help="envs' devices, round-robin, e.g. cuda:0 cuda:1 (default: --device)",
    )  # fmt: skip
    p.add_argument(
        "--threads", type=int,
        help="torch threads of this process; 0 = auto: the idle cores (measured; up to "
        "4) when a training batch is big enough to gain from them, else 1 "
        f"(default: {d.threads})",
    )  # fmt: skip
    p.add_argument(
        "--config", type=Path, metavar="FILE.toml", help="config file, strict (default: none)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value, TOML syntax, e.g. --set task.depth=5; repeatable",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="esper", description="Morphogenetic training: grow a network while it trains."
    )
    parser.add_argument("--version", action="version", version=f"esper {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    d = _defaults()
    train = sub.add_parser("train", help="train (ppo) or run (scripted) a controller")
    train.add_argument(
        "controller", choices=CONTROLLERS,
        help="ppo: train the learned controller with PPO; heuristic, random: run that "
        "scripted controller; static: never grow (the baseline); shipped: run the trained "
        "policy packaged with Esper (docs/policy_card.md), without learning",
    )  # fmt: skip
    _add_env_flags(train)
    train.add_argument(
        "--episodes", type=int,
        help=f"total episodes over all envs, a multiple of --envs (default: {d.episodes})",
    )  # fmt: skip
    train.add_argument(
        "--run-dir", type=Path, help="run folder (default: runs/<controller>-<task>)"
    )
    train.add_argument(
        "--resume", action="store_true",
        help="continue the run in --run-dir; with --episodes N, extend it to N episodes",
    )  # fmt: skip
    train.add_argument("--force", action="store_true", help="overwrite an existing run folder")
    train.add_argument("--no-report", action="store_true", help="skip the report at the end")

    ev = sub.add_parser("eval", help="evaluate a PPO checkpoint on any slot layout")
    ev.add_argument(
        "checkpoint", type=Path,
        help="a .pt file, e.g. runs/NAME/checkpoints/best.pt, or 'shipped' (docs/policy_card.md)",
    )  # fmt: skip
    _add_env_flags(ev)
    ev.add_argument("--episodes", type=int, default=8, help="evaluation episodes (default: 8)")
    ev.add_argument("--stochastic", action="store_true", help="sample instead of argmax")

    bp = sub.add_parser(
        "build-policy", help="build the shipped policy: clone a teacher, fine-tune with PPO"
    )
    bp.add_argument("--out", type=Path, required=True, help="policy file to write (.pt)")
    bp.add_argument("--seed", type=int, default=0, help="build seed (default: 0)")
    bp.add_argument(
        "--teacher", choices=("heuristic", "always-grow"), default="heuristic",
        help="controller to clone (default: heuristic)",
    )  # fmt: skip
    bp.add_argument("--ppo-rounds", type=int, help="PPO rounds of 8 episodes (default: 20)")
    bp.add_argument("--clone-out", type=Path, help="also write the clone before fine-tuning")
    bp.add_argument("--quick", action="store_true", help="a seconds-long build (tests)")

    report = sub.add_parser("report", help="(re)build plots and summary.md of a run")
    report.add_argument("run_dir", type=Path)

    sub.add_parser("tasks", help="list tasks, their slots and blueprints")
    return parser


def _parse_set(items: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not section or not name:
            raise UsageError(f"--set expects SECTION.KEY=VALUE, got {item!r}")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()  # a bare word is a string: --set run.task=digits
        out.setdefault(section, {})[name] = value
    return out


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    over = _parse_set(args.set)
    run = over.setdefault("run", {})
    for flag, key in (
        ("task", "task"), ("envs", "envs"), ("seed", "seed"), ("device", "device"),
        ("threads", "threads"),
    ):  # fmt: skip
        if getattr(args, flag, None) is not None:
            run[key] = getattr(args, flag)
    if args.slots is not None:
        from esper.slots import SlotConfig

        run["slots"] = list(SlotConfig.from_ids(args.slots).slot_ids)  # validates ids, dups
    if getattr(args, "episodes", None) is not None and args.command == "train":
        run["episodes"] = args.episodes
    if getattr(args, "controller", None) is not None:
        run["controller"] = args.controller
    if args.max_epochs is not None:
        over.setdefault("env", {})["max_epochs"] = args.max_epochs
    if getattr(args, "env_devices", None) is not None:
        run["env_devices"] = list(args.env_devices)
    return over


# Flags and the config key each sets: a --set of the same key as a flag also given is
# refused, instead of one of the two silently winning.
_FLAG_KEYS = {
    ("run", "task"): "task", ("run", "envs"): "envs", ("run", "seed"): "seed",
    ("run", "device"): "device", ("run", "threads"): "threads", ("run", "slots"): "slots",
    ("run", "env_devices"): "env_devices", ("env", "max_epochs"): "max_epochs",
}  # fmt: skip
# run keys that only training reads
_TRAIN_ONLY = ("controller", "episodes", "checkpoint_every", "tensorboard", "baseline")


def _unused_set(args: argparse.Namespace, section: str, key: str) -> str | None:
    """Why ``--set section.key`` would do nothing in this command (None: it is used)."""
    flag = _FLAG_KEYS.get((section, key))
    if flag is not None and getattr(args, flag, None) is not None:
        return f"--{flag.replace('_', '-')} sets it too; pass one of the two"
    if args.command == "eval":
        if section == "run" and key == "episodes":
            return "esper eval does not read it; use --episodes N"
        if section == "run" and key in _TRAIN_ONLY:
            return "esper eval does not read it (a training setting)"
        if section == "ppo":
            return "esper eval plays the checkpoint with the PPO settings stored in it"
        if section == "heuristic":
            return "esper eval plays the checkpoint's policy, not the heuristic"
        return None
    controller = args.controller
    if section == "run" and key == "controller":
        return f"the controller is train's first argument (esper train {controller} ...)"
    if section == "run" and key == "episodes" and args.episodes is not None:
        return "--episodes sets it too; pass one of the two"
    if section == "ppo" and controller != "ppo":
        return f"a {controller} run has no PPO; [ppo] configures `esper train ppo`"
    if section == "heuristic" and controller != "heuristic":
        return f"a {controller} run reads no [heuristic]; it configures `esper train heuristic`"
    return None


def _check_set_used(args: argparse.Namespace) -> None:
    """Refuse a --set that this command would silently ignore."""
    for section, values in _parse_set(args.set).items():
        for key, value in values.items():
            reason = _unused_set(args, section, key)
            if reason is not None:
                raise UsageError(f"--set {section}.{key}={value!r} has no effect here: {reason}")


def _merge(base: dict[str, Any], over: dict[str, dict[str, Any]]) -> dict[str, Any]:
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in over.items():
        if section in merged and not isinstance(merged[section], dict):
            raise UsageError(f"[{section}] must be a table")
        merged.setdefault(section, {}).update(values)
    return merged


def _cmd_train(args: argparse.Namespace) -> int:
    from esper.config_io import load_toml
    from esper.run import check_run_dir, train
    from esper.run_config import config_from_dict
    from esper.telemetry.report import build_report

    over = _overrides(args)
    _check_set_used(args)
    task = over["run"].get("task", "digits")
    run_dir = args.run_dir or Path("runs") / f"{args.controller}-{task}"
    if args.resume and args.force:
        raise UsageError("--resume continues a run and --force overwrites it: pass one")
    if args.resume:
        if (
            args.config is not None
            or args.set
            or any(k not in ("controller", "episodes", "threads") for k in over.get("run", {}))
        ):
            raise UsageError("--resume reuses the run's saved config; only --episodes may change")
        check_run_dir(run_dir, resume=True, force=False)
        saved = load_toml(run_dir / "config.toml")
        config = config_from_dict(saved)
        if config.run.controller != args.controller:
            raise UsageError(
                f"{str(run_dir)!r} is a {config.run.controller!r} run, not {args.controller!r}"
            )
        keep = {k: v for k, v in over["run"].items() if k in ("episodes", "threads")}
        config = config_from_dict(_merge(saved, {"run": keep}))
    else:
        base = load_toml(args.config) if args.config is not None else {}
        config = config_from_dict(_merge(base, over))
    from esper.distributed import PeerLostError, env_shard, init_distributed, shutdown
    from esper.run_config import check_devices_available, check_run_limits

    check_devices_available(config.run)  # before torchrun's process group wants the device
    # Under torchrun: one rank of a DD-PPO job (--envs is the total over all ranks).
    dist = init_distributed(config.run.device)
    envs_here = env_shard(config.run.envs, dist).count
    check_run_limits(config, envs_here)  # threads, memory: before anything is built
    console = Console()
    try:
        with console if dist.is_main else contextlib.nullcontext():  # one rank speaks
            result = train(
                config, run_dir, resume=args.resume, force=args.force, dist=dist,
                progress=console.round_done, live=console.live, command=["esper", *args.argv],
                log=lambda m: print(f"esper: {m}", file=sys.stderr), tune_process=True,
            )  # fmt: skip
    except PeerLostError as exc:
        print(f"esper: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    finally:
        shutdown(dist)
    if not dist.is_main:
        return 130 if result.interrupted else 0
    if result.interrupted:
        print(
            f"esper: interrupted after {result.rounds_done} complete rounds; checkpoint "
            f"{run_dir / 'checkpoints' / 'last.pt'}; continue with --resume",
            file=sys.stderr,
        )
    if not args.no_report:
        files = build_report(run_dir)
        print(f"esper: report written: {', '.join(str(f) for f in files)}", file=sys.stderr)
    if result.last:
        _print_table(
            f"last round ({config.run.controller}; its {config.run.envs} training episodes)",
            result.last,
        )
    return 130 if result.interrupted else 0


def _print_table(title: str, summary: dict[str, float]) -> None:
    print(f"\n{title}")
    print(f"{'metric':<16}{'mean':>10}{'std':>10}")
    for key in ("quality", "growth", "objective", "episode_return", "params_added"):
        print(f"{key:<16}{summary[key]:>10.4f}{summary[f'{key}_std']:>10.4f}")
    counts = "  ".join(
        f"{k} {int(summary[k])}"
        for k in ("germinated", "fossilized", "pruned", "illegal", "rollbacks")
    )
    print(f"events: {counts}  (over {int(summary['episodes'])} episodes)")
    if summary["rollbacks"]:
        print(
            "  (a governor rollback restores the last good host and costs a reward penalty: "
            "it lowers episode_return, not objective)"
        )


def _cmd_eval(args: argparse.Namespace) -> int:
    from esper.config_io import load_toml
    from esper.experiment import summarize
    from esper.policies import SHIPPED_NAME, SHIPPED_POLICIES, policy_path
    from esper.run import evaluate
    from esper.run_config import config_from_dict

    if str(args.checkpoint) in (SHIPPED_NAME, *SHIPPED_POLICIES):
        args.checkpoint = policy_path(str(args.checkpoint))
    if args.checkpoint.is_dir():
        folder = args.checkpoint
        # A run folder keeps its checkpoints one level down, in checkpoints/.
        found = sorted(folder.glob("*.pt")) + sorted(folder.glob("checkpoints/*.pt"))
        example = next((p for p in found if p.name == "best.pt"), found[0] if found else None)
        names = [str(p.relative_to(folder)) for p in found]
        hint = ""
        if names:
            more = f" and {len(names) - 6} more" if len(names) > 6 else ""
            hint = f"; it holds {', '.join(names[:6])}{more}"
        where = f", e.g. {str(example)!r}" if example is not None else ""
        raise UsageError(f"{str(folder)!r} is a folder; pass a checkpoint file in it{where}{hint}")
    if not args.checkpoint.is_file():
        raise UsageError(f"checkpoint {str(args.checkpoint)!r} does not exist")
    base: dict[str, Any] = {}
    saved = args.checkpoint.parent.parent / "config.toml"
    if saved.is_file():  # a checkpoint inside a run folder: start from the run's settings
        base = load_toml(saved)
        base.get("run", {}).pop("slots", None)
    if args.config is not None:
        base = _merge(base, load_toml(args.config))
    config = config_from_dict(_merge(base, _overrides(args)))
    _check_set_used(args)
    if args.episodes < 1:
        raise UsageError(f"--episodes must be >= 1, got {args.episodes}")
    from esper.run_config import check_run_limits

    check_run_limits(config, min(config.run.envs, args.episodes))  # before anything is built
    with Console() as console:
        records = evaluate(
            config,
            checkpoint=args.checkpoint,
            episodes=args.episodes,
            deterministic=not args.stochastic,
            live=console.live,
            tune_process=True,  # the CLI owns its process (run.threads)
        )
    policy = "sampled" if args.stochastic else "deterministic"
    _print_table(
        f"evaluation of {args.checkpoint} on {config.run.task} ({policy} policy; "
        f"{args.episodes} episodes on evaluation seeds, disjoint from training)",
        summarize(records),
    )
    return 0


def _cmd_build_policy(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from esper.policies.build import QUICK, BuildConfig, build_policy
    from esper.seeding import MAX_SEED

    if args.out.suffix != ".pt":
        raise UsageError(f"--out must name a .pt file, got {str(args.out)!r}")
    if not 0 <= args.seed <= MAX_SEED:  # episode seeds are derived from it, as in train
        raise UsageError(f"--seed must be in 0..{MAX_SEED}, got {args.seed}")
    if args.ppo_rounds is not None and args.ppo_rounds < 0:
        raise UsageError(f"--ppo-rounds must be >= 0 (0: ship the clone), got {args.ppo_rounds}")
    config = QUICK if args.quick else BuildConfig()
    changes: dict[str, Any] = {"seed": args.seed, "teacher": args.teacher}
    if args.ppo_rounds is not None:
        changes["ppo_rounds"] = args.ppo_rounds
    config = dataclasses.replace(config, **changes)
    torch.set_num_threads(1)  # tiny hosts: a second thread costs more than it gains
    record = build_policy(
        config, args.out, log=lambda m: print(f"esper: {m}", file=sys.stderr),
        command=" ".join(["esper", *args.argv]), clone_out=args.clone_out,
    )  # fmt: skip
    print(f"wrote {args.out} ({record['chosen']}) in {record['timings']['total_s']:.0f} s")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from esper.telemetry.report import build_report

    for path in build_report(args.run_dir):
        print(path)
    return 0


def _cmd_tasks(args: argparse.Namespace) -> int:
    import dataclasses

    from esper.model import blueprints_for
    from esper.model.morphogenetic import MorphogeneticModel
    from esper.training import TrainConfig, get_task, list_tasks
    from esper.training.tasks import describe_options

    pad = " " * 15
    for name in list_tasks():
        task = get_task(name)
        lines = [f"{name:<14} {task.description}"]
        try:
            data = task.make_data()
            model = MorphogeneticModel(task.make_host(data))
            specs = model.slot_config.specs
            lines.append(f"{pad}slots: {' '.join(f'{s.slot_id}({s.channels})' for s in specs)}")
            topology = model.topology
            lines.append(f"{pad}blueprints ({topology}): {', '.join(blueprints_for(topology))}")
        except (ValueError, OSError) as exc:  # data not on this machine
            lines.append(f"{pad}(not available here: {_cli_form(str(exc).splitlines()[0])})")
        lines.append(f"{pad}options (--set task.NAME=VALUE)   default")
        for option, default, what in describe_options(name):
            lines.append(f"{pad}  {option:<18} {_toml(default):<14} {what}".rstrip())
        hp = task.hparams
        lines.append(
            f"{pad}training defaults: optimizer={hp.optimizer} lr={hp.lr} "
            f"batch_size={hp.batch_size} batches_per_step={hp.batches_per_step or 'epoch'} "
            f"max_epochs={hp.max_epochs}"
        )
        print("\n".join(lines))
    fields = ", ".join(f.name for f in dataclasses.fields(TrainConfig))
    print(
        f"\nEvery task also takes the training options (--set task.lr=0.01; "
        f"esper.training.TrainConfig): {fields}"
    )
    return 0


def _toml(value: Any) -> str:
    """An option's default as it is written after --set (TOML has no null: "unset")."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


# Library errors name Python options; from the command line they are --set values.
_CLI_FORMS = (
    ("pass path=<", "pass --set task.path=<"),
    ("needs root=<", "needs --set env.data_root=<"),
    ("pass it as root", 'pass it with --set env.data_root="DIR"'),
    ("point root at", "point --set env.data_root at"),
)


def _cli_form(message: str) -> str:
    for library, cli in _CLI_FORMS:
        message = message.replace(library, cli)
    return message


COMMANDS = {
    "train": _cmd_train,
    "eval": _cmd_eval,
    "build-policy": _cmd_build_policy,
    "report": _cmd_report,
    "tasks": _cmd_tasks,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # for the provenance
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        if os.environ.get("ESPER_DEBUG"):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"esper: error: {_cli_form(message)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("esper: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `esper tasks | head`: the reader left; nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
