"""Architectures: arch node -> transformers config -> model, sizes, kernels, FLOPs, checkpoints, loading.

    arch           arch node -> config class -> model, parameter counts (nothing knows a family by name)
    sizes          depth/width matched to a parameter budget within ±1%
    build          the config of an arch at a size preset; configs, HF folders and tokenizers from elsewhere checked
    checkpoints    reading a checkpoint safely (plain data only)
    quant_formats  the registry of the lab's quantized formats (torchao variants), below the loader
    loading        where a model comes from, loading it, its device, dtype and size
    settings       ModelSettings: which model, on which device (every model tool's settings)
    kernels        GPU fast paths chosen from the config and the device
    flops          training FLOPs per token, peak FLOP/s, MFU
"""
