"""Developer tools that check the lab itself (mutation testing); not used by any stage."""
