"""ForgeLab: train, evaluate and serve LLMs on one workstation."""
