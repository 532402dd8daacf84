"""Text from a model: decoding settings, prompts, continuations.

    sampling       Sampling and GenerateSettings (lab.generate), prompts, greedy or sampled continuations
    stage_samples  continuations of fixed prompts at stage ends during training (callbacks.generations)
"""
