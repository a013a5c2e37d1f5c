from velollm_patch.cli import main

main()
