"""What the scaler and the deploy share."""
