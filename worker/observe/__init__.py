"""What the system shows about itself: loaded models now; metrics and logs join later."""
