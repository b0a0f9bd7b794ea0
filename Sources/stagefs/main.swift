print("stagefs")
