"""grpo: Group Relative Policy Optimization, online, through TRL's GRPOTrainer. Each optimizer
step samples ``align.num_generations`` answers to each prompt from the model being trained,
scores them with the reward components (``align.rewards``, weighted by ``reward_weights``),
turns the rewards into advantages relative to the prompt's group (``align.advantage``) and
takes a clipped policy-gradient step; ``align.beta`` > 0 adds a KL term to the reference.

Generation: transformers ``generate`` in the training process; with ``align.use_vllm`` TRL's
vLLM path (colocated, or a ``trl vllm-serve`` server), which needs CUDA because TRL hands the
new weights to vLLM over NCCL after every step (on CPU the run refuses it).

Counting: the tokens of a step are the prompts and sampled answers it trained on (counted when
they are generated); the FLOPs per token add the generation's forward pass (and the
reference's when beta > 0) to the policy's forward and backward.
"""
from __future__ import annotations

from typing import Any

from ...config import ConfigError
from .trl_base import TRLMethod, both

SCALE_REWARDS = {"group": "group", "group_mean": "none", "batch": "batch"}


def _reward_wrapper(name: str, fn):
    """TRL names a reward's metrics after ``__name__``; the lab's component name is the name."""
    def reward(prompts, completions, **kwargs):
        return fn(prompts=prompts, completions=completions, **kwargs)
    reward.__name__ = name
    return reward


class GRPO(TRLMethod):
    task = "grpo"
    data_kind = "prompts"
    trainer_path = "trl:GRPOTrainer"
    config_path = "trl:GRPOConfig"
    reference = "model"
    about_method = "GRPO: online sampling, reward components, group-relative advantages (TRL GRPOTrainer)"

    def uses_reference(self, conf) -> bool:
        return conf.align.beta > 0

    def validate(self, conf) -> None:
        super().validate(conf)
        a, st = conf.align, conf.steps
        if a.num_generations < 2:
            raise ConfigError("key 'align.num_generations' must be >= 2 (advantages compare answers within a group)")
        per_gen = st.micro_batch_size * st.grad_accum
        if per_gen % a.num_generations:
            raise ConfigError(f"steps.micro_batch_size x steps.grad_accum = {per_gen} completions per step must be a "
                              f"multiple of align.num_generations ({a.num_generations})")
        if not a.rewards:
            raise ConfigError("key 'align.rewards': grpo needs at least one reward component")
        if a.reward_weights is not None and len(a.reward_weights) != len(a.rewards):
            raise ConfigError(f"key 'align.reward_weights': {len(a.reward_weights)} weights for "
                              f"{len(a.rewards)} rewards")
        if a.beta > 0 and self.trainable == "full" and not conf.model.path:
            raise ConfigError("key 'align.beta': a full-weight grpo run with a KL term loads its reference from "
                              "model.path; a random-init shape has none (set align.beta=0)")
        from ...components import load_components
        load_components("reward", a.rewards, "align.rewards")

    def method_args(self, conf) -> dict[str, Any]:
        a = conf.align
        return {"beta": a.beta, "num_generations": a.num_generations, "max_completion_length": a.max_completion_length,
                "temperature": a.temperature, "top_p": a.top_p, "epsilon": a.epsilon,
                "num_iterations": a.num_iterations, "loss_type": a.grpo_loss,
                "scale_rewards": SCALE_REWARDS[a.advantage], "reward_weights": a.reward_weights,
                "use_vllm": a.use_vllm, "vllm_mode": a.vllm_mode,
                "vllm_gpu_memory_utilization": a.vllm_gpu_memory_utilization, "shuffle_dataset": True}

    def estimate_terms(self, conf) -> dict[str, Any]:
        """LoRA / the reference copy (beta > 0) as for every TRL method, and the generation: one
        generation batch per optimizer step of micro_batch_size x grad_accum completions per
        device (TRL's steps_per_generation = grad_accum), each prompt + max_completion_length
        tokens. The reference's log-probs are computed after generation, with no policy
        activations held, so no no-grad forward term."""
        terms = super().estimate_terms(conf)
        terms.pop("nograd_sequences_per_item", None)
        a, st = conf.align, conf.steps
        terms["generation"] = {"batch": st.micro_batch_size * st.grad_accum, "num_generations": a.num_generations,
                               "completion_len": a.max_completion_length,
                               "engine": "vllm" if a.use_vllm else "transformers"}
        return terms

    def trainer_base(self, conf) -> type:
        return counting_grpo(super().trainer_base(conf))

    def trainer_parts(self, s, tokenizer) -> dict[str, Any]:
        from ...components import load_components
        if s.conf.align.use_vllm and not s.rt.on_cuda:
            raise ConfigError("key 'align.use_vllm': TRL's vLLM generation syncs weights over NCCL and needs CUDA; "
                              "on CPU grpo generates with transformers (set align.use_vllm=false)")
        train, ev = self.open_data(s.pre)
        rewards = load_components("reward", s.conf.align.rewards, "align.rewards")
        return {"train_dataset": train, "eval_dataset": ev,
                "reward_funcs": [_reward_wrapper(n, f) for n, f in rewards.items()]}

    extra_formula = " + generation forward 2*(N_nonemb+N_head) + 4*L*A*S (+ the same for the reference if beta > 0)"

    def extra_forwards(self, conf) -> int:
        # the generation's forward always; the reference's when there is a KL term
        return 1 + int(conf is not None and self.uses_reference(conf))

    def sequence_lengths(self, pre, tokenizer) -> list[int]:
        # a prompt plus a full-length answer: the longest sequence the step trains on
        from ..text_data import sequence_lengths
        extra = pre.conf.align.max_completion_length
        return [n + extra for n in sequence_lengths(pre.train, tokenizer)]

    def summary(self, conf) -> dict[str, Any]:
        out = super().summary(conf)
        from ...components import component_fingerprints
        out["align"]["rewards"] = component_fingerprints(list(conf.align.rewards))
        out["align"]["advantage"] = conf.align.advantage
        return out


_COUNTING: dict[type, type] = {}


def counting_grpo(base: type) -> type:
    """GRPOTrainer that counts the prompt and answer tokens of each generated batch into the
    step's token count (the collator sees only prompts)."""
    if base not in _COUNTING:
        class CountingGRPO(base):
            def _generate_and_score_completions(self, inputs):
                seen = self.state.num_input_tokens_seen
                out = super()._generate_and_score_completions(inputs)
                # TRL adds the batch to num_input_tokens_seen itself; the lab's MetricsCallback
                # counts every method's tokens in one place (summed over ranks), so undo it
                self.state.num_input_tokens_seen = seen
                if self.model.training:
                    pm, cm = out["prompt_mask"], out["completion_mask"]
                    self.count_generated(int(pm.sum()) + int(cm.sum()), pm.numel() + cm.numel())
                return out
        CountingGRPO.__name__ = CountingGRPO.__qualname__ = f"Counting{base.__name__}"
        _COUNTING[base] = CountingGRPO
    return _COUNTING[base]


METHODS = both(GRPO)
