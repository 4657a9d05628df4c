"""Files mlx-sora reads and writes: checkpoint readers (safetensors, restricted torch .bin) hardened against
hostile files, output folders written atomically, mp4 video.
"""
