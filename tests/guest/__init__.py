"""The tiny test/demo guest: Debian's cloud kernel plus a busybox initramfs."""
