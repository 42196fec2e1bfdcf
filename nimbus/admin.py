"""`python -m nimbus.admin`: the operator's read-only view. The code is in `nimbus.ops.admin`."""

from nimbus.ops.admin import main

if __name__ == "__main__":
    main()
