"""mistralrs-arch-speech: Dia text-to-speech and the DAC codec behind ``Runner.generate_audio``."""
