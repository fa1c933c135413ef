"""What leaves smptrain: the DARTS file (smptrain-convert) and prediction with it (smptrain-predict)."""
