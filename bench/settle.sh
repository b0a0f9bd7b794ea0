# settle: shared by the bench scripts (sourced; they set HERE). See settle.py.
settle() {
    python3 "$HERE/settle.py"
}
