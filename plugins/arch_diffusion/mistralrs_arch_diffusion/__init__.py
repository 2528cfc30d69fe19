"""mistralrs-arch-diffusion: Flux image generation behind ``Runner.generate_image``."""
