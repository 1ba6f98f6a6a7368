/// What this build is, for `--version` and logs.
public enum BuildInfo {
    /// `git describe` of the checkout at build time, or the package version with "unknown
    /// commit" when built without git (scripts/version says which form when). The plugin
    /// Plugins/BuildVersion writes `gitVersion` before every build.
    public static let version: String = gitVersion
}
