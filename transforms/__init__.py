"""What is done to one record: media checks, tiling, video frames, audio, TTS, text."""
