"""Program → Program passes (fusion, folding, quantization), installed as `tandemc.passes`."""
