"""`python -m nimbus.web`: the live web view. The code is in `nimbus.ops.web`."""

from nimbus.ops.web import main

if __name__ == "__main__":
    main()
