"""Text generation: sampling and decoding loops over any choicelm decoder."""
