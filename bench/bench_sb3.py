"""Esper's masked recurrent PPO next to sb3-contrib's RecurrentPPO on equal work.

Equal work: the same samples per update (envs x steps), LSTM width, epochs and
minibatches, and networks of about the same parameter count (printed); both on a random
env whose episodes end at the rollout end (``end``), at random points inside it
(``mid``: lengths uniform on [1, 2 x steps]) or never (``never``). Timed: the update
alone (best of ``--repeats``, after a warm-up update; Esper's and sb3's updates are timed
in turn, so a change in the machine's load falls on both), and choosing actions for
``--act-envs`` envs (Esper's ``act`` with its masks vs sb3's ``predict``, called in turn;
median of many calls). Also: Esper's masked heads vs an unmasked policy of the same trunk and size.
Times are CPU time of this process (``time.process_time``), not wall time: on a machine
shared with other jobs it is the steadier figure; run with ``--threads 1``.

    pip install -e '.[bench]'          # sb3-contrib
    python bench/bench_sb3.py          # 64 envs x 32 steps, 4 slots, LSTM 128, 4 x 4
    python bench/bench_sb3.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from esper.actions import NUM_OPS, ActionMasks
from esper.policy.network import FactoredRecurrentActorCritic
from esper.rl import PPOAgent, PPOConfig
from esper.slots import SlotConfig

EPISODES = ("end", "mid", "never")
GLOBAL_DIM, SLOT_DIM, NUM_BLUEPRINTS, NUM_BLENDS = 8, 6, 3, 3


class EpisodeClock:
    """Per-env episode ends: at the rollout end, at random points, or never."""

    def __init__(self, num_envs: int, steps: int, episodes: str, seed: int) -> None:
        if episodes not in EPISODES:
            raise ValueError(f"episodes must be one of {EPISODES}, got {episodes!r}")
        self.steps, self.episodes = steps, episodes
        self.gen = torch.Generator().manual_seed(seed)
        self.t = 0
        self.left = self._lengths(num_envs)

    def _lengths(self, n: int) -> torch.Tensor:
        return torch.randint(1, 2 * self.steps + 1, (n,), generator=self.gen)

    def tick(self) -> torch.Tensor:
        self.t += 1
        if self.episodes == "end":
            return torch.full_like(self.left, self.t % self.steps == 0, dtype=torch.bool)
        if self.episodes == "never":
            return torch.zeros_like(self.left, dtype=torch.bool)
        self.left -= 1
        done = self.left <= 0
        self.left[done] = self._lengths(int(done.sum()))
        return done


class RandomMaskedEnv:
    """N lockstep envs with random observations, random legal masks and random rewards."""

    def __init__(self, num_envs: int, num_slots: int, steps: int, episodes: str, seed: int = 0):
        self.num_envs, self.num_slots = num_envs, num_slots
        self.slot_config = SlotConfig.for_grid(1, num_slots)
        self.global_dim, self.slot_dim = GLOBAL_DIM, SLOT_DIM
        self.blueprints = tuple(f"bp{i}" for i in range(NUM_BLUEPRINTS))
        self.clock = EpisodeClock(num_envs, steps, episodes, seed)
        self.gen = torch.Generator().manual_seed(seed + 1)

    def _rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.gen)

    def _observe(self) -> tuple[dict[str, torch.Tensor], ActionMasks]:
        n, s = self.num_envs, self.num_slots
        obs = {"global": self._rand(n, GLOBAL_DIM), "slots": self._rand(n, s, SLOT_DIM)}
        slot = self._rand(n, NUM_OPS, s) < 0.6
        slot[..., 0] |= ~slot.any(-1)  # every op row allows a slot
        blueprint = self._rand(n, s, NUM_BLUEPRINTS) < 0.6
        blueprint[..., 0] |= ~blueprint.any(-1)
        op = self._rand(n, NUM_OPS) < 0.7
        op[:, 0] = True  # WAIT
        blend = torch.ones(n, NUM_BLENDS, dtype=torch.bool)
        return obs, ActionMasks(op, slot, blueprint, blend)

    def reset(self) -> tuple[dict[str, torch.Tensor], ActionMasks]:
        return self._observe()

    def step(self, actions: torch.Tensor):
        from types import SimpleNamespace

        done = self.clock.tick()
        obs, masks = self._observe()
        rewards = self._rand(self.num_envs)
        return SimpleNamespace(
            obs=obs, masks=masks, rewards=rewards, terminated=done, truncated=torch.zeros_like(done)
        )


def _sb3_model(args: argparse.Namespace, episodes: str):
    import gymnasium as gym
    import numpy as np
    from sb3_contrib import RecurrentPPO
    from stable_baselines3.common.vec_env import DummyVecEnv

    obs_dim = GLOBAL_DIM + args.slots * SLOT_DIM

    class Env(gym.Env):
        observation_space = gym.spaces.Box(0.0, 1.0, (obs_dim,), np.float32)
        action_space = gym.spaces.MultiDiscrete([NUM_OPS, args.slots, NUM_BLUEPRINTS, NUM_BLENDS])

        def __init__(self, seed: int) -> None:
            self.clock = EpisodeClock(1, args.steps, episodes, seed)
            self.rng = np.random.default_rng(seed)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            return self.rng.random(obs_dim, dtype=np.float32), {}

        def step(self, action):
            done = bool(self.clock.tick()[0])
            return (
                self.rng.random(obs_dim, dtype=np.float32),
                float(self.rng.random()),
                done,
                False,
                {},
            )

    vec_env = DummyVecEnv([lambda i=i: Env(i) for i in range(args.envs)])
    width = args.width
    return RecurrentPPO(
        "MlpLstmPolicy",
        vec_env,
        n_steps=args.steps,
        batch_size=args.envs * args.steps // args.minibatches,
        n_epochs=args.epochs,
        target_kl=None,
        policy_kwargs={
            "lstm_hidden_size": args.hidden,
            "n_lstm_layers": 1,
            "shared_lstm": True,  # one LSTM for actor and critic, as in Esper
            "enable_critic_lstm": False,
            "net_arch": {"pi": [width, width], "vf": [width]},
        },
        device="cpu",
        seed=0,
        verbose=0,
    )


def _sb3_width(args: argparse.Namespace, target: int) -> int:
    """Width of sb3's actor/critic MLPs that brings its parameter count closest to ``target``."""
    obs_dim, h = GLOBAL_DIM + args.slots * SLOT_DIM, args.hidden
    actions = NUM_OPS + args.slots + NUM_BLUEPRINTS + NUM_BLENDS
    lstm = 4 * h * (obs_dim + h) + 8 * h

    def count(w: int) -> int:
        pi = h * w + w + w * w + w
        return lstm + pi + (h * w + w) + (w * actions + actions) + (w + 1)

    return min(range(8, 4 * h + 1), key=lambda w: abs(count(w) - target))


class Sb3Updates:
    """sb3-contrib's RecurrentPPO: ``timed()`` collects one rollout (untimed) and returns
    the CPU seconds of ``train()`` on it."""

    def __init__(self, model, args: argparse.Namespace) -> None:
        self.model, self.args = model, args
        model.learn(total_timesteps=args.envs * args.steps)  # warm-up: a rollout and an update

    def timed(self) -> float:
        model, args = self.model, self.args
        _, callback = model._setup_learn(args.envs * args.steps, None, False)
        callback.on_training_start(locals(), globals())
        model.collect_rollouts(model.env, callback, model.rollout_buffer, args.steps)
        start = time.process_time()
        model.train()
        return time.process_time() - start


def interleaved_updates(args: argparse.Namespace, episodes: str) -> tuple[float, float]:
    """Best-of-``repeats`` update seconds (esper, sb3), the two timed turn about so a
    change in the machine's load falls on both."""
    from bench_ppo_update import EsperUpdates  # imports this module: import it late

    ours, theirs = EsperUpdates(args, episodes), Sb3Updates(_sb3_model(args, episodes), args)
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(args.repeats):
        times[0].append(ours.timed()[0])
        times[1].append(theirs.timed())
    return min(times[0]), min(times[1])


def _interleaved_median_ms(fns: dict[str, object], calls: int) -> dict[str, float]:
    """Median CPU time of this process per call of each function, called in turn (less
    disturbed by other jobs than wall time on a shared machine; torch runs on one thread)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(calls):
        for name, fn in fns.items():
            start = time.process_time()
            fn()
            times[name].append(time.process_time() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


class UnmaskedPolicy(torch.nn.Module):
    """Esper's trunk with independent, unmasked heads (an MLP with one hidden layer, as
    wide as makes its parameter count equal to Esper's masked heads)."""

    def __init__(self, net: FactoredRecurrentActorCritic, sizes: tuple[int, ...]) -> None:
        super().__init__()
        self.net, self.sizes = net, sizes
        trunk = {"global_encoder", "slot_encoder", "lstm", "value_head"}
        target = sum(
            p.numel() for name, p in net.named_parameters() if name.split(".")[0] not in trunk
        )
        h, out = net.hidden_size, sum(sizes)
        width = max(1, round((target - out) / (h + 1 + out)))
        self.head = torch.nn.Sequential(
            torch.nn.Linear(h, width), torch.nn.ReLU(), torch.nn.Linear(width, out)
        )
        self.head_params = (target, sum(p.numel() for p in self.head.parameters()))

    @torch.no_grad()
    def act(self, obs, hidden):
        step_obs = {k: v.unsqueeze(0) for k, v in obs.items()}
        core, _, values, new_hidden = self.net(step_obs, hidden)
        logits = torch.split(self.head(core[0]), self.sizes, dim=-1)
        dists = [torch.distributions.Categorical(logits=x) for x in logits]
        actions = torch.stack([d.sample() for d in dists], -1)
        log_probs = torch.stack([d.log_prob(actions[:, i]) for i, d in enumerate(dists)], -1)
        return actions, log_probs, values, new_hidden


def act_timings(args: argparse.Namespace, sb3_model) -> tuple[dict[str, float], tuple[int, int]]:
    n = args.act_envs
    env = RandomMaskedEnv(n, args.slots, args.steps, "never")
    agent = PPOAgent(env.slot_config, GLOBAL_DIM, SLOT_DIM, env.blueprints, _config(args))
    agent.network.eval()
    obs, masks = env.reset()
    hidden = agent.initial_hidden(n)
    sizes = (NUM_OPS, args.slots, NUM_BLUEPRINTS, NUM_BLENDS)
    unmasked = UnmaskedPolicy(agent.network, sizes)
    norm = agent.obs_normalizer.normalize(obs)
    noise = torch.rand(n, 4)

    @torch.no_grad()
    def masked_heads():
        agent.network.get_action(norm, hidden, masks, noise=noise)

    fns = {
        "esper act (masked)": lambda: agent.act(obs, masks, hidden),
        "network, masked heads": masked_heads,
        "network, unmasked twin": lambda: unmasked.act(norm, hidden),
    }
    if sb3_model is not None:
        import numpy as np

        flat = torch.cat([obs["global"], obs["slots"].flatten(1)], 1).numpy()
        starts = np.zeros(n, dtype=bool)
        state = (np.zeros((1, n, args.hidden), np.float32),) * 2

        def predict():
            sb3_model.predict(flat, state=state, episode_start=starts, deterministic=False)

        fns["sb3 predict"] = predict
    return _interleaved_median_ms(fns, args.calls), unmasked.head_params


def _config(args: argparse.Namespace) -> PPOConfig:
    return PPOConfig(
        hidden=args.hidden, n_epochs=args.epochs, num_minibatches=args.minibatches, target_kl=None
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    import bench_ppo_update

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128, help="LSTM size")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--minibatches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--act-envs", type=int, default=64)
    parser.add_argument("--calls", type=int, default=200, help="timed act/predict calls")
    parser.add_argument("--episodes", default=",".join(EPISODES))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--act-only", action="store_true", help="skip the update timings")
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    args = parser.parse_args(argv)
    if args.quick:
        args.envs, args.steps, args.hidden, args.repeats, args.calls = 8, 8, 32, 1, 20
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import sb3_contrib
    except ImportError:
        sb3_contrib = None
        print("sb3-contrib RecurrentPPO: not installed (pip install -e '.[bench]' to compare)")
    samples = args.envs * args.steps * args.epochs
    common = [
        f"--{k}={getattr(args, k)}"
        for k in ("envs", "steps", "slots", "hidden", "epochs", "minibatches", "repeats")
    ]
    esper_params = sum(
        p.numel()
        for p in FactoredRecurrentActorCritic(
            args.slots, GLOBAL_DIM, SLOT_DIM, NUM_BLUEPRINTS, NUM_BLENDS, hidden=args.hidden
        ).parameters()
    )
    args.width = _sb3_width(args, esper_params)
    results: dict[str, float] = {}
    model = None
    if sb3_contrib is None and not args.act_only:
        bench_ppo_update.main([*common, f"--episodes={args.episodes}"])
    if sb3_contrib is not None and not args.act_only:
        print("update, best of --repeats, esper and sb3 timed in turn")
        print(
            f"{'episodes end':<14} {'esper samples/s':>16} {'sb3 samples/s':>14} "
            f"{'esper / sb3':>12}"
        )
        for episodes in args.episodes.split(","):
            ours, theirs = interleaved_updates(args, episodes)
            results[f"update/{episodes}"] = theirs / ours
            print(
                f"{episodes:<14} {samples / ours:>16,.0f} {samples / theirs:>14,.0f} "
                f"{theirs / ours:>11.2f}x"
            )
    if sb3_contrib is not None:
        model = _sb3_model(args, "never")
    if model is not None:
        sb3_params = sum(p.numel() for p in model.policy.parameters())
        print(
            f"parameters: esper {esper_params:,}, sb3 {sb3_params:,} "
            f"(LSTM {args.hidden}, pi [{args.width}, {args.width}], vf [{args.width}])"
        )
    acts, acts_params = act_timings(args, model)
    print(f"choosing actions for {args.act_envs} envs (median ms per call):")
    for name, ms in acts.items():
        print(f"  {name:<22} {ms:8.3f} ms")
    if "sb3 predict" in acts:
        results["act/sb3_over_esper"] = acts["sb3 predict"] / acts["esper act (masked)"]
        print(f"  esper act speed-up over sb3 predict: {results['act/sb3_over_esper']:.2f}x")
    ratio = acts["network, unmasked twin"] / acts["network, masked heads"]
    print(f"  head parameters: masked {acts_params[0]:,}, unmasked twin {acts_params[1]:,}")
    print(f"  masked heads vs unmasked twin: {ratio:.2f}x (>= 1: masked is no slower)")
    return results


if __name__ == "__main__":
    main()
