from kvpki_cli.entry import main

main()
