"""What n-gram speculation buys a split over a slow network, on real llama.cpp."""
