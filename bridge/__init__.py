"""maskbridge: a self-hosted number-masking VoIP bridge on Asterisk ARI."""
