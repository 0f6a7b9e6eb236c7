from didomi_marketo.cli import main

main()
