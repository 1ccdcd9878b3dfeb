function schedule(ctx)
  -- This will be caught and logged
  error("Something went wrong!")
end
