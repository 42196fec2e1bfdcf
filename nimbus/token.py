"""`python -m nimbus.token`: issue a development token. The code is in `nimbus.doorman.token`."""

from nimbus.doorman.token import main

if __name__ == "__main__":
    raise SystemExit(main())
