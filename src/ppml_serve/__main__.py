from ppml_serve.cli.main import main

main()
