"""What executes a plan: the executor that takes a policy's steps on the model, the search a policy asks its
questions through, the activations kept between steps, and the one-block fallback."""
