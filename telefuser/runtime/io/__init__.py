"""A run's inputs and outputs: user parameters, conditioning images, the video and its file."""
