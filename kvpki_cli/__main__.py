from kvpki_cli.cli import main

main()
