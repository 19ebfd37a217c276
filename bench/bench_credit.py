"""Credit that sees the decision (issue 22, item 2): the variance of the policy-gradient
estimate under each reward mode, on the same rollouts.

One set of episodes is played (lockstep envs, ``reward_mode="twin"`` so the static twin
of every host trains alongside; the policy's sampled actions drive the envs). From the
same steps the three reward modes are rebuilt exactly (esper.env.rewards):

* objective:    r = Δq − λ·Δg − penalty                 (= twin's r + the twin's Δb)
* twin:         r = Δq − Δb − λ·Δg − penalty            (the env's reward)
* contribution: r = objective r + Φ(s_t) − Φ(s_{t−1})   (Φ of the live seeds' clipped
                counterfactual contributions, Φ = 0 at reset and on the last step)

For each mode and episode i the REINFORCE estimate g_i = ∇θ Σ_t A_t log π(a_t | s_t) is
taken with A_t = G_t − b_t: G_t the discounted return-to-go (the agent's γ) and b_t the
leave-one-out mean of G_t over the other episodes at the same step (a baseline that does
not depend on episode i, so every mode's estimate stays unbiased and the three share it).
The figure is tr Cov(g) / n: the variance of the mean gradient over n episodes (summed
over the network's parameters), with ‖mean g‖² beside it and their ratio (signal /
noise). As E‖ḡ‖² = ‖E g‖² + tr Cov/n, the signal is ‖ḡ‖² − tr Cov/n (negative: none
seen) and signal / noise = that / (tr Cov/n); "episodes for S/N 1" is the batch size
at which the true gradient would be as large as the noise of its mean. A variance near
0 with no signal (e.g. twin rewards of a policy that never grows) is no better credit.
Twin's Δb does not depend on the actions, so twin and objective estimate the same
gradient. The contribution shaping is potential-based with γ = 1 (esper.env.rewards):
with undiscounted returns-to-go it adds −Φ(s_{t−1}), a state baseline, but with the
agent's γ < 1 it also adds (1 − γ)-weighted future potentials, which depend on the
actions: its expectation is close to, not equal to, the others'. The issue's rule is to
pick the mode with the smallest variance; read contribution's signal with that caveat.

    OMP_NUM_THREADS=1 python bench/bench_credit.py --episodes 24 --policy shipped
    OMP_NUM_THREADS=1 python bench/bench_credit.py --episodes 24 --policy untrained
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from esper.env import EnvConfig
from esper.env.rewards import contribution_potential
from esper.env.vector import VectorMorphogenesisEnv
from esper.policies import load_policy
from esper.rl import PPOAgent
from esper.rl.cloning import discounted_returns
from esper.seeding import episode_seed

MODES = ("objective", "twin", "contribution")


def play(vec: VectorMorphogenesisEnv, agent: PPOAgent, seeds: list[int]) -> dict:
    """Sampled episodes on ``seeds`` (a multiple of the env count): raw observations,
    masks, executed actions and the per-step rewards of every mode."""
    n = vec.num_envs
    cols: dict[str, list] = {"obs": [], "masks": [], "actions": [], **{m: [] for m in MODES}}
    for start in range(0, len(seeds), n):
        obs, masks, _ = vec.reset(seeds=seeds[start : start + n])
        hidden = agent.initial_hidden(n)
        steps = []
        potential = np.zeros(n)
        for t in range(vec.max_epochs):
            step = agent.act(obs, masks, hidden, False, update_normalizer=False)
            out = vec.step(step.actions)
            last = t == vec.max_epochs - 1
            rewards = {m: np.zeros(n) for m in MODES}
            for e, info in enumerate(out.infos):
                parts = info["reward_parts"]
                twin = parts["total"]
                objective = twin + parts["baseline_delta"]
                new = 0.0
                if not last:  # after the last step the env has reset: Φ is 0 by definition
                    states = vec.envs[e].model.slot_states()
                    new = contribution_potential(
                        [s.stage for s in states],
                        [s.contribution for s in states],
                        vec.envs[e].config.contribution_weight,
                    )
                rewards["twin"][e] = twin
                rewards["objective"][e] = objective
                rewards["contribution"][e] = objective + new - potential[e]
                potential[e] = new
            steps.append((obs, masks, step.actions, rewards))
            obs, masks, hidden = out.obs, out.masks, step.hidden
        cols["obs"].append({k: torch.stack([s[0][k] for s in steps]) for k in ("global", "slots")})
        cols["masks"].append([s[1] for s in steps])
        cols["actions"].append(torch.stack([s[2] for s in steps]))
        for m in MODES:
            cols[m].append(torch.tensor(np.stack([s[3][m] for s in steps]), dtype=torch.float32))
    return cols


def gradients(agent: PPOAgent, cols: dict, mode: str) -> np.ndarray:
    """[M, P] per-episode policy-gradient estimates under ``mode``'s rewards."""
    from esper.actions import ActionMasks

    net, gamma = agent.network, agent.config.gamma
    grads = []
    for part in range(len(cols["actions"])):
        raw, actions = cols["obs"][part], cols["actions"][part]
        masks = ActionMasks(
            *(
                torch.stack(m)
                for m in zip(*(s.as_tuple() for s in cols["masks"][part]), strict=True)
            )
        )
        obs = agent.obs_normalizer.normalize(raw) if agent.config.normalize_observations else raw
        returns = torch.cat(
            [discounted_returns(cols[mode][p], gamma) for p in range(len(cols[mode]))], 1
        )
        grads.append((obs, actions, masks, part, returns))
    all_returns = grads[0][4]  # [T, M]
    m_total = all_returns.shape[1]
    # leave-one-out mean of G_t at each step over the other episodes
    loo = (all_returns.sum(1, keepdim=True) - all_returns) / max(1, m_total - 1)
    adv = all_returns - loo
    n = cols["actions"][0].shape[1]
    out = []
    for obs, actions, masks, part, _ in grads:
        for e in range(actions.shape[1]):
            col = slice(e, e + 1)
            net.zero_grad(set_to_none=True)
            res = net.evaluate_actions(
                {k: v[:, col] for k, v in obs.items()},
                actions[:, col],
                ActionMasks(*(t[:, col] for t in masks.as_tuple())),
                net.get_initial_hidden(1, agent.device),
            )
            a = adv[:, part * n + e : part * n + e + 1]
            (res.log_probs.sum(-1) * a).sum().backward()
            out.append(
                torch.cat([p.grad.reshape(-1) for p in net.parameters() if p.grad is not None])
                .double()
                .numpy()
            )
    return np.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--episodes", type=int, default=24)
    ap.add_argument("--envs", type=int, default=8)
    ap.add_argument("--policy", choices=("shipped", "untrained"), default="shipped")
    ap.add_argument("--width", type=int, default=1, help="digits host width (the build's is 1)")
    ap.add_argument("--lambdas", type=float, nargs=2, default=(0.01, 0.15))
    ap.add_argument("--max-epochs", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON of the figures (default: the bench out dir)")
    ap.add_argument("--quick", action="store_true", help="4 episodes of 4 steps (a smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.episodes, args.envs, args.max_epochs = 4, 2, 4
    if args.out is None:
        args.out = str(Path(os.environ.get("ESPER_BENCH_OUT", "bench/out")) / "credit.json")
    torch.manual_seed(args.seed)
    cfg = EnvConfig(
        task="digits",
        task_options={"width": args.width},
        max_epochs=args.max_epochs,
        growth_penalty_range=tuple(args.lambdas),
        reward_mode="twin",
    )
    vec = VectorMorphogenesisEnv(args.envs, cfg)
    env0 = vec.envs[0]
    if args.policy == "shipped":
        agent = load_policy(env0.slot_config, env0.action_spec.blueprints)
    else:
        from esper.env.observations import GLOBAL_DIM, SLOT_DIM
        from esper.rl import PPOConfig

        agent = PPOAgent(env0.slot_config, GLOBAL_DIM, SLOT_DIM, env0.action_spec.blueprints,
                         config=PPOConfig(seed=args.seed))  # fmt: skip
    # evaluation-side seeds: disjoint from every build's and run's training seeds
    seeds = [episode_seed(args.seed, i, 0, evaluation=True) for i in range(args.episodes)]
    t0 = time.perf_counter()
    cols = play(vec, agent, seeds)
    play_s = time.perf_counter() - t0
    rows = {}
    ref = None
    for mode in MODES:
        g = gradients(agent, cols, mode)
        m = g.shape[0]
        var_mean = float(g.var(0, ddof=1).sum() / m)  # tr Cov / n
        signal = float((g.mean(0) ** 2).sum())
        # SE of the variance figure: jackknife over episodes
        jack = []
        for i in range(m):
            rest = np.delete(g, i, 0)
            jack.append(rest.var(0, ddof=1).sum() / m)
        jack = np.array(jack)
        se = float(np.sqrt((m - 1) / m * ((jack - jack.mean()) ** 2).sum()))
        returns = torch.cat(cols[mode], 1).sum(0).numpy()
        rows[mode] = {
            "var_of_mean_grad": var_mean,
            "var_se_jackknife": se,
            "mean_grad_sq_norm": signal,
            "return_mean": float(returns.mean()),
            "return_std": float(returns.std(ddof=1)),
        }
        # E‖ḡ‖² = ‖E g‖² + tr Cov/n: the unbiased ‖E g‖² takes the noise off
        rows[mode]["true_grad_sq_norm"] = signal - var_mean
        rows[mode]["signal_to_noise"] = (signal - var_mean) / var_mean if var_mean > 0 else 0.0
        # episodes per update for ‖E g‖² = tr Cov/n (the mean gradient half signal)
        rows[mode]["episodes_for_snr_1"] = (
            var_mean * m / (signal - var_mean) if signal > var_mean else float("inf")
        )
        ref = ref or var_mean
        rows[mode]["var_vs_objective"] = var_mean / ref
    print(f"# {m} episodes (evaluation seeds of seed {args.seed}), policy {args.policy}, digits "
          f"width {args.width}, λ ~ U{tuple(args.lambdas)}, {env0.max_epochs} steps; "
          f"played in {play_s:.0f} s")  # fmt: skip
    print(
        "| reward mode | tr Cov(g)/n (jackknife SE) | vs objective | ‖mean g‖² | "
        "‖E g‖² = ‖mean g‖² − tr Cov/n | signal / noise | episodes for S/N 1 | "
        "return mean ± std |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for mode, r in rows.items():
        print(
            f"| {mode} | {r['var_of_mean_grad']:.4g} ({r['var_se_jackknife']:.2g}) | "
            f"{r['var_vs_objective']:.2f} | {r['mean_grad_sq_norm']:.4g} | "
            f"{r['true_grad_sq_norm']:+.4g} | {r['signal_to_noise']:+.2f} | "
            f"{r['episodes_for_snr_1']:.0f} | "
            f"{r['return_mean']:+.4f} ± {r['return_std']:.4f} |"
        )
    best = min(rows, key=lambda k: rows[k]["var_of_mean_grad"])
    print(f"lowest variance: {best}")
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"args": vars(args), "rows": rows, "play_s": play_s}, indent=1))


if __name__ == "__main__":
    main()
