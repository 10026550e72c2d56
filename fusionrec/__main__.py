from fusionrec.cli import main

main()
