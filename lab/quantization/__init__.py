"""Quantizing a trained model into torchao variants (the variants themselves: lab/models/quant_formats.py).

    settings   QuantizeSettings (lab.quantize)
    quantizer  quantizing, saving and re-checking each variant, the quantize.json index
"""
